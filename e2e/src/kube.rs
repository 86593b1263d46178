//! `kubectl` through `std::process::Command`, for the kind suite. The names and labels are
//! the operator's (`operator/src/component.rs`, `operator/src/builders.rs`): every child of
//! the OrlyRelay `R` is `R-<component>` and carries `app.kubernetes.io/name=orly`,
//! `app.kubernetes.io/instance=R`, `app.kubernetes.io/component=<component>`.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `kubectl ARGS`; returns trimmed stdout, fails with stderr.
pub fn kubectl(args: &[&str]) -> Result<String> {
    let out = Command::new(std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()))
        .args(args)
        .output()
        .with_context(|| format!("run kubectl {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `kubectl -n NS get KIND NAME -o json`, parsed.
pub fn get_json(ns: &str, kind: &str, name: &str) -> Result<serde_json::Value> {
    let out = kubectl(&["-n", ns, "get", kind, name, "-o", "json"])?;
    serde_json::from_str(&out).context("kubectl output is not JSON")
}

/// The label selector of one component of an OrlyRelay.
pub fn component_selector(relay: &str, component: &str) -> String {
    format!(
        "app.kubernetes.io/name=orly,app.kubernetes.io/instance={relay},app.kubernetes.io/component={component}"
    )
}

/// Name of a child object: `<relay>-<component>`.
pub fn child_name(relay: &str, component: &str) -> String {
    format!("{relay}-{component}")
}

/// Names of the pods of a component that are Running and not being deleted.
pub fn running_pods(ns: &str, relay: &str, component: &str) -> Result<Vec<String>> {
    let out = kubectl(&[
        "-n",
        ns,
        "get",
        "pods",
        "-l",
        &component_selector(relay, component),
        "-o",
        "json",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mut names = Vec::new();
    for pod in v["items"].as_array().into_iter().flatten() {
        let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
        let running = pod["status"]["phase"] == "Running";
        let ready = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if running && ready && !deleting {
            if let Some(n) = pod["metadata"]["name"].as_str() {
                names.push(n.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// `status.readyReplicas` of a Deployment (0 when absent).
pub fn ready_replicas(ns: &str, deployment: &str) -> Result<i64> {
    let v = get_json(ns, "deployment", deployment)?;
    Ok(v["status"]["readyReplicas"].as_i64().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_selectors_follow_the_operator() {
        assert_eq!(
            child_name("scaled", "sync-negentropy"),
            "scaled-sync-negentropy"
        );
        assert_eq!(
            component_selector("minimal", "db"),
            "app.kubernetes.io/name=orly,app.kubernetes.io/instance=minimal,app.kubernetes.io/component=db"
        );
    }
}
