//! Test fixtures shared by the unit tests: OrlyRelays from YAML snippets.

use crate::crd::{OrlyRelay, OrlyRelaySpec};

/// An OrlyRelay `test` in namespace `ns` (uid `uid-1`, generation 1) with the given spec.
pub fn relay_from_yaml(spec_yaml: &str) -> OrlyRelay {
    let spec: OrlyRelaySpec = serde_yaml::from_str(spec_yaml).expect("spec parses");
    let mut relay = OrlyRelay::new("test", spec);
    relay.metadata.namespace = Some("ns".into());
    relay.metadata.uid = Some("uid-1".into());
    relay.metadata.generation = Some(1);
    relay
}
