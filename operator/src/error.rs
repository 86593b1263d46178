//! The crate's error type, one variant per reconcile stage so logs and metrics say where it broke.

use crate::component::Component;

/// Everything that can go wrong while reconciling an OrlyRelay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OrlyRelay did not deserialize into our types (reported in its status, not retried).
    #[error("OrlyRelay {name} does not match the schema: {message}")]
    InvalidObject { name: String, message: String },

    /// The spec parsed but is inconsistent (reported in its status, not retried).
    #[error("OrlyRelay spec is invalid: {0}")]
    InvalidSpec(String),

    /// Applying or deleting one child failed.
    #[error("{action} {kind} {name} for component {component} failed: {source}")]
    Child {
        component: Component,
        action: &'static str,
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },

    /// Several children failed; each is reported, none stops the others.
    #[error("{} child operations failed; first: {}", .0.len(), .0[0])]
    Children(Vec<Error>),

    /// Writing the OrlyRelay status failed.
    #[error("updating status of {name} failed: {source}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },

    /// Creating the gRPC token Secret failed.
    #[error("creating the gRPC token Secret {name} failed: {source}")]
    Secret {
        name: String,
        #[source]
        source: kube::Error,
    },

    /// The child caches have not been filled by their watches (yet).
    #[error("the child caches are not ready: {0}")]
    CacheNotReady(String),

    /// A Kubernetes API call outside of a child operation failed.
    #[error("kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Short label for the `error` metric dimension.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidObject { .. } => "invalid_object",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Child { .. } | Error::Children(_) | Error::Secret { .. } => "child",
            Error::CacheNotReady(_) => "cache",
            Error::Status { .. } => "status",
            Error::Kube(_) => "kube",
        }
    }
}

/// Result with the crate's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
