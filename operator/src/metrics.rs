//! Prometheus metrics of the operator (through the `metrics` facade) and their exporter.

use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::error::Error;

/// Reconciles finished, labelled by `result` (`ok` or `error`).
pub const RECONCILIATIONS: &str = "orly_operator_reconciliations_total";
/// Failed reconciles, labelled by the failing stage (`error`).
pub const RECONCILE_ERRORS: &str = "orly_operator_reconcile_errors_total";
/// Reconcile duration in seconds.
pub const RECONCILE_DURATION: &str = "orly_operator_reconcile_duration_seconds";
/// 1 while this instance holds the leader Lease.
pub const LEADER: &str = "orly_operator_leader";

/// Install the global Prometheus recorder; the handle renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    metrics::describe_counter!(RECONCILIATIONS, "OrlyRelay reconciles by result");
    metrics::describe_counter!(RECONCILE_ERRORS, "failed OrlyRelay reconciles by error");
    metrics::describe_histogram!(
        RECONCILE_DURATION,
        metrics::Unit::Seconds,
        "OrlyRelay reconcile duration"
    );
    metrics::describe_gauge!(LEADER, "1 while this instance is the leader");
    Ok(handle)
}

/// Count one reconcile.
pub fn record_reconcile(elapsed: Duration, error: Option<&Error>) {
    metrics::histogram!(RECONCILE_DURATION).record(elapsed.as_secs_f64());
    match error {
        None => metrics::counter!(RECONCILIATIONS, "result" => "ok").increment(1),
        Some(e) => {
            metrics::counter!(RECONCILIATIONS, "result" => "error").increment(1);
            metrics::counter!(RECONCILE_ERRORS, "error" => e.metric_label()).increment(1);
        }
    }
}

/// Set the leader gauge.
pub fn set_leader(leader: bool) {
    metrics::gauge!(LEADER).set(if leader { 1.0 } else { 0.0 });
}
