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
    Ok(ready_pod_names(&v))
}

/// The pods of a `kubectl get pods -o json` list that are Running, Ready and not being
/// deleted, sorted.
pub fn ready_pod_names(list: &serde_json::Value) -> Vec<String> {
    let mut names = Vec::new();
    for pod in list["items"].as_array().into_iter().flatten() {
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
    names
}

/// The first container of a Deployment or StatefulSet (as JSON).
fn first_container(workload: &serde_json::Value) -> &serde_json::Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

/// The Secret (name, key) the workload's container reads `var` from, if it does.
pub fn env_secret_ref(workload: &serde_json::Value, var: &str) -> Option<(String, String)> {
    let env = first_container(workload)["env"].as_array()?;
    let entry = env.iter().find(|e| e["name"] == var)?;
    let selector = &entry["valueFrom"]["secretKeyRef"];
    Some((
        selector["name"].as_str()?.to_string(),
        selector["key"].as_str()?.to_string(),
    ))
}

/// The container's `preStop` exec command, if any.
pub fn pre_stop_command(workload: &serde_json::Value) -> Option<Vec<String>> {
    let command =
        first_container(workload)["lifecycle"]["preStop"]["exec"]["command"].as_array()?;
    command
        .iter()
        .map(|c| c.as_str().map(str::to_string))
        .collect()
}

/// Who a NetworkPolicy lets reach `port`: `Some(None)` for everyone (a rule without `from`),
/// `Some(Some(components))` for the components its pod selector names, `None` when no rule
/// opens the port.
pub fn policy_callers(policy: &serde_json::Value, port: i64) -> Option<Option<Vec<String>>> {
    let rules = policy["spec"]["ingress"].as_array()?;
    let rule = rules.iter().find(|r| {
        r["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["port"] == port)
    })?;
    let Some(from) = rule["from"].as_array() else {
        return Some(None);
    };
    let components = from
        .iter()
        .flat_map(|peer| {
            peer["podSelector"]["matchExpressions"]
                .as_array()
                .into_iter()
                .flatten()
        })
        .filter(|e| e["key"] == "app.kubernetes.io/component" && e["operator"] == "In")
        .flat_map(|e| e["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    Some(Some(components))
}

/// Whether a Service is headless (`clusterIP: None`).
pub fn is_headless(service: &serde_json::Value) -> bool {
    service["spec"]["clusterIP"] == "None"
}

/// A key of a Secret, decoded (`kubectl` does the base64).
pub fn secret_value(ns: &str, name: &str, key: &str) -> Result<String> {
    kubectl(&[
        "-n",
        ns,
        "get",
        "secret",
        name,
        "-o",
        &format!("go-template={{{{index .data \"{key}\" | base64decode}}}}"),
    ])
}

/// `status.readyReplicas` of a Deployment (0 when absent).
pub fn ready_replicas(ns: &str, deployment: &str) -> Result<i64> {
    let v = get_json(ns, "deployment", deployment)?;
    Ok(v["status"]["readyReplicas"].as_i64().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ready_pods_are_running_ready_and_not_deleting() {
        let pod = |name: &str, phase: &str, ready: &str, deleting: bool| {
            let mut p = json!({
                "metadata": {"name": name},
                "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]},
            });
            if deleting {
                p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            p
        };
        let list = json!({"items": [
            pod("b", "Running", "True", false),
            pod("a", "Running", "True", false),
            pod("pending", "Pending", "False", false),
            pod("unready", "Running", "False", false),
            pod("going", "Running", "True", true),
        ]});
        assert_eq!(ready_pod_names(&list), ["a", "b"]);
        assert!(ready_pod_names(&json!({})).is_empty());
    }

    /// A relay Deployment and NetworkPolicies shaped as the operator builds them
    /// (operator/src/builders.rs).
    fn relay_deployment() -> serde_json::Value {
        json!({"spec": {"template": {"spec": {"containers": [{
            "name": "orly",
            "env": [{"name": "ORLY_GRPC_AUTH_TOKEN",
                     "valueFrom": {"secretKeyRef": {"name": "minimal-grpc-auth", "key": "token"}}}],
            "lifecycle": {"preStop": {"exec": {"command":
                ["orly", "drain", "--port", "3334", "--timeout", "25s"]}}},
        }]}}}})
    }

    #[test]
    fn token_and_drain_are_read_from_the_workload() {
        let d = relay_deployment();
        assert_eq!(
            env_secret_ref(&d, "ORLY_GRPC_AUTH_TOKEN"),
            Some(("minimal-grpc-auth".into(), "token".into()))
        );
        assert_eq!(env_secret_ref(&d, "ORLY_DB_URL"), None);
        assert_eq!(
            pre_stop_command(&d).unwrap(),
            ["orly", "drain", "--port", "3334", "--timeout", "25s"]
        );
        assert_eq!(pre_stop_command(&json!({})), None);
    }

    #[test]
    fn policy_callers_name_who_reaches_a_port() {
        let db = json!({"spec": {"ingress": [
            {"from": [{"podSelector": {
                "matchLabels": {"app.kubernetes.io/instance": "minimal"},
                "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                      "values": ["acl", "relay"]}]}}],
             "ports": [{"port": 50051, "protocol": "TCP"}]},
            {"from": [{"podSelector": {}}], "ports": [{"port": 9100, "protocol": "TCP"}]},
        ]}});
        assert_eq!(
            policy_callers(&db, 50051),
            Some(Some(vec!["acl".to_string(), "relay".to_string()]))
        );
        assert_eq!(policy_callers(&db, 9100), Some(Some(vec![])));
        assert_eq!(policy_callers(&db, 3334), None);
        let relay = json!({"spec": {"ingress": [{"ports": [{"port": 3334, "protocol": "TCP"}]}]}});
        assert_eq!(policy_callers(&relay, 3334), Some(None));
        assert!(is_headless(&json!({"spec": {"clusterIP": "None"}})));
        assert!(!is_headless(&json!({"spec": {"clusterIP": "10.96.0.1"}})));
    }

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
