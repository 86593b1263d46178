//! Helpers shared by the integration tests: the fake API server and OrlyRelay fixtures.

#![allow(dead_code)] // each test binary uses a different part

pub mod examples;
pub mod fake_api;

use std::sync::Arc;

use kube::core::error_boundary::DeserializeGuard;
use orly_operator::controller::{reconcile, reporter, Context};
use orly_operator::crd::{OrlyRelay, OrlyRelaySpec};
use orly_operator::plan::OperatorDefaults;

pub use fake_api::FakeApi;

/// Namespace of every test OrlyRelay.
pub const NS: &str = "ns";
/// Name of the test OrlyRelay.
pub const NAME: &str = "main";
/// Image tag the test operator defaults to.
pub const TAG: &str = "1.2.3";

/// An OrlyRelay named [`NAME`] in [`NS`] with the spec given as YAML.
pub fn relay(spec_yaml: &str) -> OrlyRelay {
    let spec: OrlyRelaySpec = serde_yaml::from_str(spec_yaml).expect("spec parses");
    let mut relay = OrlyRelay::new(NAME, spec);
    relay.metadata.namespace = Some(NS.into());
    relay
}

/// A reconcile context talking to `fake`.
pub fn context(fake: &FakeApi) -> Arc<Context> {
    Arc::new(Context::new(
        fake.client(),
        OperatorDefaults {
            repository: "ghcr.io/orly-relay".into(),
            tag: TAG.into(),
        },
        reporter(Some("test".into())),
    ))
}

/// A fake holding one OrlyRelay with `spec_yaml`, and a context on it.
pub fn setup(spec_yaml: &str) -> (FakeApi, Arc<Context>) {
    let fake = FakeApi::new();
    fake.insert(&relay(spec_yaml));
    let ctx = context(&fake);
    (fake, ctx)
}

/// Run one reconcile of the stored OrlyRelay, as the controller would after a watch event.
pub async fn reconcile_stored(
    fake: &FakeApi,
    ctx: &Arc<Context>,
) -> orly_operator::Result<kube::runtime::controller::Action> {
    let stored: OrlyRelay = fake.get(NS, NAME).expect("relay stored");
    reconcile(Arc::new(DeserializeGuard(Ok(stored))), ctx.clone()).await
}
