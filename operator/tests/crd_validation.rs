//! The CRD's validation proven in-process: every example OrlyRelay is checked against the
//! generated `openAPIV3Schema` with a JSON Schema validator and against every
//! `x-kubernetes-validations` CEL rule with kube-cel (on the `cel` crate); the valid examples
//! pass and each invalid one is refused with its rule's message.

mod common;

use common::examples::{self, Example};
use kube_cel::{compile_schema, CompiledSchema, Validator};
use orly_operator::crd::OrlyRelay;
use orly_operator::plan::{plan, OperatorDefaults};
use serde_json::Value;

/// Kubernetes prunes unknown fields; closing every object that lists its properties makes the
/// JSON Schema validator report them instead, so a typo in an example fails the test.
/// The root stays open: the API server adds apiVersion, kind and metadata to every CRD schema.
fn closed(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        properties.values_mut().for_each(close);
    }
    schema
}

fn close(node: &mut Value) {
    let Value::Object(map) = node else { return };
    let preserves = map
        .get("x-kubernetes-preserve-unknown-fields")
        .is_some_and(|v| v == true);
    if map.contains_key("properties") && !preserves && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for value in map.values_mut() {
        match value {
            Value::Object(_) => close(value),
            Value::Array(items) => items.iter_mut().for_each(close),
            _ => {}
        }
    }
}

/// The metadata schema is just `type: object`; the API server fills these before validating.
fn as_stored(example: &Example) -> Value {
    let mut object = example.object.clone();
    object["metadata"]["namespace"] = "default".into();
    object
}

struct Checker {
    schema: jsonschema::Validator,
    cel: CompiledSchema,
    validator: Validator,
}

impl Checker {
    fn new() -> Self {
        let schema = examples::schema();
        let cel = compile_schema(&schema);
        Self {
            schema: jsonschema::validator_for(&closed(&schema)).expect("schema compiles"),
            cel,
            validator: Validator::new(),
        }
    }

    /// Every refusal: JSON Schema errors, then CEL rule messages.
    fn refusals(&self, object: &Value) -> Vec<String> {
        let mut out: Vec<String> = self
            .schema
            .iter_errors(object)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if let Err(errors) = self.validator.validate_compiled(&self.cel, object, None) {
            out.extend(
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field_path, e.message)),
            );
        }
        out
    }
}

fn rules(node: &Value, out: &mut Vec<(String, String)>) {
    match node {
        Value::Object(map) => {
            if let Some(Value::Array(validations)) = map.get("x-kubernetes-validations") {
                for v in validations {
                    out.push((
                        v["rule"].as_str().unwrap_or_default().to_string(),
                        v["message"].as_str().unwrap_or_default().to_string(),
                    ));
                }
            }
            map.values().for_each(|v| rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn every_cel_rule_compiles() {
    let schema = examples::schema();
    let mut found = Vec::new();
    rules(&schema, &mut found);
    let messages: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
    for expected in [
        "relay.nip77 requires sync.negentropy.enabled",
        "postgres requires a URL secret: set database.postgres.urlSecret",
        "sqlite allows one db replica",
        "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
    ] {
        assert!(
            messages.contains(&expected),
            "rule {expected:?} missing from {messages:?}"
        );
    }
    let compiled = compile_schema(&schema);
    let errors = compiled.compilation_errors();
    assert!(
        errors.is_empty(),
        "CEL rules that do not compile: {errors:?}"
    );
    // Every rule must also have a message, since the API server shows it to the user.
    assert!(found.iter().all(|(_, m)| !m.is_empty()));
}

#[test]
fn every_valid_example_passes_schema_and_cel_and_plans() {
    let checker = Checker::new();
    let valid = examples::valid();
    assert!(valid.len() >= 3, "examples missing");
    for example in valid {
        let object = as_stored(&example);
        let refusals = checker.refusals(&object);
        assert!(
            refusals.is_empty(),
            "{}: {refusals:?}",
            example.path.display()
        );
        let mut relay: OrlyRelay = serde_json::from_value(object)
            .unwrap_or_else(|e| panic!("{}: {e}", example.path.display()));
        relay.metadata.uid = Some("uid".into());
        plan(&relay, &OperatorDefaults::default())
            .unwrap_or_else(|e| panic!("{}: {e}", example.path.display()));
    }
}

#[test]
fn every_invalid_example_is_refused_with_its_rules_message() {
    let checker = Checker::new();
    let invalid = examples::invalid();
    assert!(invalid.len() >= 6, "invalid examples missing");
    for example in invalid {
        assert!(
            !example.expect.is_empty(),
            "{} has no `# expect:` line",
            example.path.display()
        );
        let refusals = checker.refusals(&as_stored(&example));
        for expected in &example.expect {
            assert!(
                refusals.iter().any(|r| r.contains(expected.as_str())),
                "{}: expected a refusal containing {expected:?}, got {refusals:?}",
                example.path.display()
            );
        }
    }
}

#[test]
fn an_unknown_field_is_reported() {
    let checker = Checker::new();
    let mut object = as_stored(&examples::valid()[0]);
    object["spec"]["relay"] = serde_json::json!({"replicaz": 1});
    let refusals = checker.refusals(&object);
    assert!(
        refusals.iter().any(|r| r.contains("replicaz")),
        "{refusals:?}"
    );
}
