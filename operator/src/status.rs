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

/// Replica counts of a workload as the API server reports them, with the disruption the
/// component tolerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkloadObservation {
    pub generation: i64,
    pub observed_generation: i64,
    pub desired: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    /// Pods that may be missing while the workload still counts as Available (its PDB's
    /// budget: 1 for a component that can run several replicas, else 0).
    pub max_unavailable: i32,
}

impl WorkloadObservation {
    /// Read a Deployment; `spec.replicas` defaults to 1 as the API server does.
    pub fn from_deployment(d: &Deployment, max_unavailable: i32) -> Self {
        let status = d.status.clone().unwrap_or_default();
        Self {
            generation: d.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            available: status.available_replicas.unwrap_or(0),
            max_unavailable,
        }
    }

    /// Read a StatefulSet.
    pub fn from_stateful_set(s: &StatefulSet, max_unavailable: i32) -> Self {
        let status = s.status.clone().unwrap_or_default();
        Self {
            generation: s.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            available: status.available_replicas.unwrap_or(0),
            max_unavailable,
        }
    }

    /// Available pods the component needs: desired − max unavailable, and at least one.
    pub fn min_available(&self) -> i32 {
        if self.desired <= 0 {
            0
        } else {
            (self.desired - self.max_unavailable).max(1)
        }
    }

    /// Available in the gating sense: the controller has seen the latest spec, every pod was
    /// created from it, and enough of them are available. One pod lost to a drain (its PDB's
    /// budget) does not make a scaled component unavailable, so it blocks no higher tier.
    pub fn is_available(&self) -> bool {
        self.observed_generation >= self.generation
            && self.updated >= self.desired
            && self.available >= self.min_available()
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
            ComponentState::Observed(o) if o.min_available() < o.desired => format!(
                "{component} {}/{} available (needs {}), {}/{} updated",
                o.available,
                o.desired,
                o.min_available(),
                o.updated,
                o.desired
            ),
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
    /// The reconcile-paused annotation is set: nothing was applied, the components are only
    /// observed.
    pub paused: bool,
}

/// Message of the Paused reason.
pub const PAUSED_MESSAGE: &str =
    "reconcile paused by the orly.dev/reconcile-paused annotation: nothing is applied or deleted";

/// The status after a reconcile.
pub fn compute_status(input: &StatusInput<'_>) -> OrlyRelayStatus {
    let tiers = available_tiers(input.components);
    let all_available = tiers == Tier::ALL.len() as i32;
    let blocked = Tier::ALL.get(tiers as usize).copied();
    let degraded = !input.errors.is_empty();

    let phase = if input.paused {
        Phase::Paused
    } else if degraded {
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
        (Some(w), false) if input.paused => ("False", "Paused", format!("{PAUSED_MESSAGE}; {w}")),
        (Some(w), false) => ("False", "TierNotAvailable", w.clone()),
    };
    let (progressing_status, progressing_reason, progressing_message) = match &waiting {
        _ if input.paused => ("False", "Paused", PAUSED_MESSAGE.to_string()),
        Some(w) => ("True", "RollingOut", w.clone()),
        None => (
            "False",
            "RolloutComplete",
            "every tier is available".to_string(),
        ),
    };
    let (degraded_status, degraded_reason, degraded_message) = if degraded {
        ("True", "ApplyFailed", input.errors.join("; "))
    } else if input.paused {
        ("False", "Paused", PAUSED_MESSAGE.to_string())
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
        paused: false,
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
            max_unavailable: 0,
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
            max_unavailable: 0,
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
    fn one_pod_lost_to_a_drain_keeps_a_scaled_workload_available() {
        // Three db pods with a PDB (one may go): a drained pod is being replaced.
        let drained = WorkloadObservation {
            generation: 4,
            observed_generation: 4,
            desired: 3,
            updated: 3,
            ready: 2,
            available: 2,
            max_unavailable: 1,
        };
        assert_eq!(drained.min_available(), 2);
        assert!(drained.is_available());
        assert!(!WorkloadObservation {
            available: 1,
            ..drained
        }
        .is_available());
        // A rollout still creating pods of the old template is not done.
        assert!(!WorkloadObservation {
            updated: 2,
            ..drained
        }
        .is_available());
        // A single replica needs its one pod; none is fine only when none is wanted.
        let single = WorkloadObservation {
            desired: 1,
            updated: 1,
            ready: 0,
            available: 0,
            max_unavailable: 0,
            ..drained
        };
        assert!(!single.is_available());
        assert!(WorkloadObservation {
            available: 1,
            ..single
        }
        .is_available());
        // Even with a budget, one replica of one is never "enough missing".
        assert_eq!(
            WorkloadObservation {
                max_unavailable: 1,
                ..single
            }
            .min_available(),
            1
        );
        assert!(WorkloadObservation {
            desired: 0,
            updated: 0,
            ..single
        }
        .is_available());
    }

    #[test]
    fn a_paused_relay_says_so_and_still_reports_what_it_sees() {
        let components = [
            (Component::Db, available(1)),
            (Component::Acl, ComponentState::NotCreated { desired: 1 }),
            (Component::Relay, ComponentState::NotCreated { desired: 1 }),
        ];
        let status = compute_status(&StatusInput {
            generation: Some(3),
            components: &components,
            errors: &[],
            previous: None,
            now: time(7),
            paused: true,
        });
        assert_eq!(status.phase, Some(Phase::Paused));
        assert_eq!(status.available_tiers, 1);
        let by_type = |t: &str| {
            let c = status.conditions.iter().find(|c| c.type_ == t).unwrap();
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        assert_eq!(
            by_type(PROGRESSING),
            ("False".into(), "Paused".into(), PAUSED_MESSAGE.into())
        );
        assert_eq!(
            by_type(READY),
            (
                "False".into(),
                "Paused".into(),
                format!("{PAUSED_MESSAGE}; waiting for tier services: acl not created yet")
            )
        );
        assert_eq!(by_type(DEGRADED).0, "False");
    }

    #[test]
    fn deployment_without_status_is_not_available() {
        let d = Deployment::default();
        let o = WorkloadObservation::from_deployment(&d, 0);
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
            paused: false,
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
            paused: false,
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
            paused: false,
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
                    max_unavailable: 0,
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
            paused: false,
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
            paused: false,
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
