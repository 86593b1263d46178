//! orly-operator: reconciles the `OrlyRelay` custom resource into orly's services, tier by tier.
//!
//! Stages of a reconcile, each in its own module: [`plan`] validates the spec, [`builders`]
//! build whole child objects, [`controller`] applies them with server-side apply and gates each
//! tier on the one below, [`status`] turns what it saw into the status.

pub mod builders;
pub mod children;
pub mod component;
pub mod controller;
pub mod crd;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod status;

#[cfg(test)]
pub(crate) mod testdata;

pub use crd::{OrlyRelay, OrlyRelaySpec, OrlyRelayStatus};
pub use error::{Error, Result};
