//! The example OrlyRelays: valid ones in `operator/examples/`, invalid ones in
//! `operator/tests/invalid/`, each invalid file naming the message it must be refused with.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One example file.
#[derive(Debug, Clone)]
pub struct Example {
    pub path: PathBuf,
    pub object: Value,
    /// `# expect:` lines: substrings of the in-process refusal.
    pub expect: Vec<String>,
    /// `# expect-apiserver:` lines: substrings of the API server's refusal.
    pub expect_apiserver: Vec<String>,
}

fn dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn load_dir(relative: &str) -> Vec<Example> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir(relative))
        .expect("example directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("example readable");
            let header = |prefix: &str| -> Vec<String> {
                text.lines()
                    .filter_map(|l| l.strip_prefix(prefix))
                    .map(|s| s.trim().to_string())
                    .collect()
            };
            let object: Value =
                serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            Example {
                expect: header("# expect:"),
                expect_apiserver: header("# expect-apiserver:"),
                path,
                object,
            }
        })
        .collect()
}

/// Every valid example OrlyRelay.
pub fn valid() -> Vec<Example> {
    load_dir("examples")
}

/// Every invalid example OrlyRelay.
pub fn invalid() -> Vec<Example> {
    load_dir("tests/invalid")
}

/// The checked-in CRD as JSON.
pub fn crd() -> Value {
    let text = std::fs::read_to_string(dir("../crds/orlyrelay.yaml")).expect("crds/orlyrelay.yaml");
    serde_yaml::from_str(&text).expect("CRD parses")
}

/// The `openAPIV3Schema` of the CRD's only version.
pub fn schema() -> Value {
    crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}
