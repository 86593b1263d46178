//! Readiness and status: when a workload counts as Available, which tier the rollout is gated
//! at, and the OrlyRelay status (phase, Ready/Progressing/Degraded conditions, per-component
//! replicas) derived from that. Pure functions only.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::component::{Component, ComponentExt, Tier};
use crate::crd::{ComponentStatus, OrlyRelayStatus, Phase};

/// Condition types the operator maintains.
pub const READY: &str = "Ready";
/// See [`READY`].
pub const PROGRESSING: &str = "Progressing";
/// See [`READY`].
pub const DEGRADED: &str = "Degraded";

/// Replica counts of a workload as the API server reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkloadObservation {
    pub generation: i64,
    pub observed_generation: i64,
    pub desired: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
}

impl WorkloadObservation {
    /// Read a Deployment; `spec.replicas` defaults to 1 as the API server does.
    pub fn from_deployment(d: &Deployment) -> Self {
        let status = d.status.clone().unwrap_or_default();
        Self {
            generation: d.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            available: status.available_replicas.unwrap_or(0),
        }
    }

    /// Read a StatefulSet.
    pub fn from_stateful_set(s: &StatefulSet) -> Self {
        let status = s.status.clone().unwrap_or_default();
        Self {
            generation: s.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            available: status.available_replicas.unwrap_or(0),
        }
    }

    /// Available in the gating sense: the controller has seen the latest spec and every desired
    /// replica is updated and available.
    pub fn is_available(&self) -> bool {
        self.observed_generation >= self.generation
            && self.updated == self.desired
            && self.available == self.desired
    }
}

/// What the reconcile learned about one enabled component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    /// Gated behind a lower tier and not created yet.
    NotCreated { desired: i32 },
    /// The workload exists; these are its counts.
    Observed(WorkloadObservation),
    /// Applying one of its children failed.
    Failed { desired: i32, message: String },
}

impl ComponentState {
    /// Available in the gating sense.
    pub fn is_available(&self) -> bool {
        matches!(self, ComponentState::Observed(o) if o.is_available())
    }

    fn counts(&self) -> (i32, i32) {
        match self {
            ComponentState::NotCreated { desired } | ComponentState::Failed { desired, .. } => {
                (0, *desired)
            }
            ComponentState::Observed(o) => (o.ready, o.desired),
        }
    }

    fn describe(&self, component: Component) -> String {
        match self {
            ComponentState::NotCreated { .. } => format!("{component} not created yet"),
            ComponentState::Observed(o) if o.observed_generation < o.generation => {
                format!(
                    "{component} rollout of generation {} not observed yet",
                    o.generation
                )
            }
            ComponentState::Observed(o) => format!(
                "{component} {}/{} available, {}/{} updated",
                o.available, o.desired, o.updated, o.desired
            ),
            ComponentState::Failed { message, .. } => format!("{component} failed: {message}"),
        }
    }
}

/// Whether every enabled component of `tier` is Available.
pub fn tier_available(components: &[(Component, ComponentState)], tier: Tier) -> bool {
    components
        .iter()
        .filter(|(c, _)| c.tier() == tier)
        .all(|(_, s)| s.is_available())
}

/// Number of tiers, bottom first, that are Available without a gap.
pub fn available_tiers(components: &[(Component, ComponentState)]) -> i32 {
    Tier::ALL
        .iter()
        .take_while(|t| tier_available(components, **t))
        .count() as i32
}

/// Inputs of the status computation for one reconcile.
#[derive(Debug, Clone)]
pub struct StatusInput<'a> {
    /// `metadata.generation` of the OrlyRelay.
    pub generation: Option<i64>,
    /// Every enabled component in rollout order.
    pub components: &'a [(Component, ComponentState)],
    /// Messages of the child operations that failed this time.
    pub errors: &'a [String],
    /// The status before this reconcile, to keep transition times.
    pub previous: Option<&'a OrlyRelayStatus>,
    /// Time stamped on changed conditions.
    pub now: Time,
}

/// The status after a reconcile.
pub fn compute_status(input: &StatusInput<'_>) -> OrlyRelayStatus {
    let tiers = available_tiers(input.components);
    let all_available = tiers == Tier::ALL.len() as i32;
    let blocked = Tier::ALL.get(tiers as usize).copied();
    let degraded = !input.errors.is_empty();

    let phase = if degraded {
        Phase::Degraded
    } else if all_available {
        Phase::Ready
    } else {
        Phase::Progressing
    };

    let waiting = blocked.map(|tier| {
        let pending: Vec<String> = input
            .components
            .iter()
            .filter(|(c, s)| c.tier() == tier && !s.is_available())
            .map(|(c, s)| s.describe(*c))
            .collect();
        format!("waiting for tier {tier}: {}", pending.join(", "))
    });

    let (ready_status, ready_reason, ready_message) = match (&waiting, degraded) {
        (None, false) => (
            "True",
            "Available",
            format!("all {} components are available", input.components.len()),
        ),
        (_, true) => ("False", "ApplyFailed", input.errors.join("; ")),
        (Some(w), false) => ("False", "TierNotAvailable", w.clone()),
    };
    let (progressing_status, progressing_reason, progressing_message) = match &waiting {
        Some(w) => ("True", "RollingOut", w.clone()),
        None => (
            "False",
            "RolloutComplete",
            "every tier is available".to_string(),
        ),
    };
    let (degraded_status, degraded_reason, degraded_message) = if degraded {
        ("True", "ApplyFailed", input.errors.join("; "))
    } else {
        ("False", "AsExpected", "every child was applied".to_string())
    };

    let conditions = [
        (READY, ready_status, ready_reason, ready_message),
        (
            PROGRESSING,
            progressing_status,
            progressing_reason,
            progressing_message,
        ),
        (DEGRADED, degraded_status, degraded_reason, degraded_message),
    ];
    let components = input
        .components
        .iter()
        .map(|(c, s)| {
            let (ready, desired) = s.counts();
            ComponentStatus {
                name: c.name().to_string(),
                ready_replicas: ready,
                desired_replicas: desired,
                available: s.is_available(),
            }
        })
        .collect();
    let relay_replicas = input
        .components
        .iter()
        .find(|(c, _)| *c == Component::Relay)
        .map(|(_, s)| {
            let (ready, desired) = s.counts();
            format!("{ready}/{desired}")
        });
    OrlyRelayStatus {
        phase: Some(phase),
        observed_generation: input.generation,
        conditions: build_conditions(&conditions, input),
        components,
        available_tiers: tiers,
        relay_replicas,
    }
}

/// The status of an OrlyRelay that cannot be reconciled until its spec is edited.
pub fn invalid_status(
    generation: Option<i64>,
    message: &str,
    previous: Option<&OrlyRelayStatus>,
    now: Time,
) -> OrlyRelayStatus {
    let input = StatusInput {
        generation,
        components: &[],
        errors: &[],
        previous,
        now,
    };
    let conditions = [
        (READY, "False", "InvalidSpec", message.to_string()),
        (PROGRESSING, "False", "InvalidSpec", message.to_string()),
        (DEGRADED, "True", "InvalidSpec", message.to_string()),
    ];
    OrlyRelayStatus {
        phase: Some(Phase::Invalid),
        observed_generation: generation,
        conditions: build_conditions(&conditions, &input),
        components: previous.map(|p| p.components.clone()).unwrap_or_default(),
        available_tiers: 0,
        relay_replicas: previous.and_then(|p| p.relay_replicas.clone()),
    }
}

fn build_conditions(
    wanted: &[(&str, &str, &str, String)],
    input: &StatusInput<'_>,
) -> Vec<Condition> {
    wanted
        .iter()
        .map(|(type_, status, reason, message)| {
            let previous = input
                .previous
                .and_then(|p| p.conditions.iter().find(|c| c.type_ == *type_));
            // The transition time moves only when the status flips, as metav1.Condition demands.
            let last_transition_time = match previous {
                Some(p) if p.status == *status => p.last_transition_time.clone(),
                _ => input.now.clone(),
            };
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: truncate(message, 1024),
                observed_generation: input.generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Condition messages are bounded (32 KiB by the API); keep them readable well below that.
fn truncate(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_string();
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn available(desired: i32) -> ComponentState {
        ComponentState::Observed(WorkloadObservation {
            generation: 2,
            observed_generation: 2,
            desired,
            updated: desired,
            ready: desired,
            available: desired,
        })
    }

    #[test]
    fn availability_needs_observed_generation_updated_and_available() {
        let ok = WorkloadObservation {
            generation: 3,
            observed_generation: 3,
            desired: 2,
            updated: 2,
            ready: 2,
            available: 2,
        };
        assert!(ok.is_available());
        assert!(!WorkloadObservation {
            observed_generation: 2,
            ..ok
        }
        .is_available());
        assert!(!WorkloadObservation { updated: 1, ..ok }.is_available());
        assert!(!WorkloadObservation { available: 1, ..ok }.is_available());
        assert!(WorkloadObservation {
            observed_generation: 4,
            ..ok
        }
        .is_available());
    }

    #[test]
    fn deployment_without_status_is_not_available() {
        let d = Deployment::default();
        let o = WorkloadObservation::from_deployment(&d);
        assert_eq!(o.desired, 1);
        assert!(!o.is_available());
    }

    #[test]
    fn new_relay_is_progressing_at_the_db_tier() {
        let components = [
            (
                Component::Db,
                ComponentState::Observed(WorkloadObservation {
                    generation: 1,
                    desired: 1,
                    ..WorkloadObservation::default()
                }),
            ),
            (Component::Acl, ComponentState::NotCreated { desired: 1 }),
            (Component::Relay, ComponentState::NotCreated { desired: 1 }),
        ];
        let status = compute_status(&StatusInput {
            generation: Some(1),
            components: &components,
            errors: &[],
            previous: None,
            now: time(100),
        });
        let expected = serde_json::json!({
            "phase": "Progressing",
            "observedGeneration": 1,
            "availableTiers": 0,
            "relayReplicas": "0/1",
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "TierNotAvailable",
                 "message": "waiting for tier db: db rollout of generation 1 not observed yet",
                 "observedGeneration": 1, "lastTransitionTime": "1970-01-01T00:01:40Z"},
                {"type": "Progressing", "status": "True", "reason": "RollingOut",
                 "message": "waiting for tier db: db rollout of generation 1 not observed yet",
                 "observedGeneration": 1, "lastTransitionTime": "1970-01-01T00:01:40Z"},
                {"type": "Degraded", "status": "False", "reason": "AsExpected",
                 "message": "every child was applied",
                 "observedGeneration": 1, "lastTransitionTime": "1970-01-01T00:01:40Z"},
            ],
            "components": [
                {"name": "db", "readyReplicas": 0, "desiredReplicas": 1, "available": false},
                {"name": "acl", "readyReplicas": 0, "desiredReplicas": 1, "available": false},
                {"name": "relay", "readyReplicas": 0, "desiredReplicas": 1, "available": false},
            ],
        });
        assert_eq!(serde_json::to_value(&status).unwrap(), expected);
    }

    #[test]
    fn all_tiers_available_is_ready_and_keeps_unchanged_transition_times() {
        let components = [
            (Component::Db, available(1)),
            (Component::Acl, available(1)),
            (Component::SyncCluster, available(3)),
            (Component::Relay, available(1)),
        ];
        let first = compute_status(&StatusInput {
            generation: Some(2),
            components: &components,
            errors: &[],
            previous: None,
            now: time(100),
        });
        assert_eq!(first.phase, Some(Phase::Ready));
        assert_eq!(first.available_tiers, 3);
        assert_eq!(first.relay_replicas.as_deref(), Some("1/1"));
        let ready = &first.conditions[0];
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            ("True", "Available", "all 4 components are available")
        );

        // A later reconcile with the same outcome must not move lastTransitionTime.
        let second = compute_status(&StatusInput {
            generation: Some(3),
            components: &components,
            errors: &[],
            previous: Some(&first),
            now: time(200),
        });
        assert!(second
            .conditions
            .iter()
            .all(|c| c.last_transition_time == time(100)));
        assert!(second
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn gating_reports_the_first_unavailable_tier_only() {
        let components = [
            (Component::Db, available(1)),
            (Component::Acl, available(1)),
            (
                Component::SyncNegentropy,
                ComponentState::Observed(WorkloadObservation {
                    generation: 2,
                    observed_generation: 2,
                    desired: 2,
                    updated: 2,
                    ready: 1,
                    available: 1,
                }),
            ),
            (Component::Relay, ComponentState::NotCreated { desired: 1 }),
        ];
        assert!(tier_available(&components, Tier::Db));
        assert!(!tier_available(&components, Tier::Services));
        assert_eq!(available_tiers(&components), 1);
        let status = compute_status(&StatusInput {
            generation: Some(2),
            components: &components,
            errors: &[],
            previous: None,
            now: time(5),
        });
        assert_eq!(
            status.conditions[1].message,
            "waiting for tier services: sync-negentropy 1/2 available, 2/2 updated"
        );
    }

    #[test]
    fn child_errors_make_the_relay_degraded() {
        let components = [
            (Component::Db, available(1)),
            (
                Component::Acl,
                ComponentState::Failed {
                    desired: 1,
                    message: "boom".into(),
                },
            ),
        ];
        let errors = ["apply Deployment test-acl failed: boom".to_string()];
        let status = compute_status(&StatusInput {
            generation: Some(1),
            components: &components,
            errors: &errors,
            previous: None,
            now: time(5),
        });
        assert_eq!(status.phase, Some(Phase::Degraded));
        let degraded = &status.conditions[2];
        assert_eq!(degraded.type_, DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, "ApplyFailed");
        assert_eq!(degraded.message, errors[0]);
    }

    #[test]
    fn invalid_spec_status() {
        let status = invalid_status(Some(4), "sqlite allows one db replica", None, time(9));
        assert_eq!(status.phase, Some(Phase::Invalid));
        assert_eq!(
            status
                .conditions
                .iter()
                .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
                .collect::<Vec<_>>(),
            [
                ("Ready", "False", "InvalidSpec"),
                ("Progressing", "False", "InvalidSpec"),
                ("Degraded", "True", "InvalidSpec")
            ]
        );
        assert!(status
            .conditions
            .iter()
            .all(|c| c.observed_generation == Some(4)));
    }
}
