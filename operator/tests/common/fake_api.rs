//! An in-memory Kubernetes API server behind a `tower-test` mock service: it stores objects,
//! answers get/list/watch/create/patch/put/delete like the API server does for what the
//! operator and kube-lease-manager use, records every request for assertions and injects
//! faults on demand. What it mirrors of the real one:
//!
//! - server-side apply merged per field manager: each manager owns the fields it applied
//!   (`metadata.managedFields`); a field its only owner stops applying is removed (and
//!   defaulted, so a Deployment's dropped `spec.replicas` becomes 1), one another manager still
//!   owns stays; a changed field owned by another manager conflicts unless forced;
//! - updates (put, merge patch, create, the `scale` subresource as the HPA controller and
//!   `kubectl scale` use it) take ownership of the fields they change from everyone else;
//! - the status subresource, generation and resourceVersion, label selectors, watch replay;
//! - Service `clusterIP`: allocated when not headless, immutable afterwards.

#![allow(dead_code)] // each test binary uses a different part of the fake

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::client::Body;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Response body: whole JSON, or a stream of watch events.
pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Option<Value>,
}

impl Recorded {
    /// `METHOD path`, for readable assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Debug, Clone)]
struct Fault {
    method: Method,
    path: String,
    code: u16,
    reason: String,
    remaining: usize,
}

/// Storage key: API base (`/apis/apps/v1`), resource plural, namespace, name.
type Key = (String, String, String, String);

#[derive(Debug)]
struct Target {
    base: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (base, rest) = match *segs.first()? {
        "api" => (format!("/api/{}", segs.get(1)?), &segs[2..]),
        "apis" => (
            format!("/apis/{}/{}", segs.get(1)?, segs.get(2)?),
            &segs[3..],
        ),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    Some(Target {
        base,
        namespace,
        resource: rest.first()?.to_string(),
        name: rest.get(1).map(|s| s.to_string()),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

struct Watcher {
    base: String,
    resource: String,
    namespace: Option<String>,
    selector: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Bytes>,
}

struct HistoryEntry {
    rv: u64,
    key: Key,
    kind: &'static str,
    object: Value,
}

/// A field owner as managedFields names it: manager, operation (Apply or Update) and
/// subresource ("" for the main resource).
type OwnerId = (String, &'static str, String);

/// Who owns which field (JSON pointer, tokens escaped) of one object.
type Owners = BTreeMap<String, BTreeSet<OwnerId>>;

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    owners: HashMap<Key, Owners>,
    /// Cluster IPs handed out so far.
    cluster_ips: u32,
    rv: u64,
    uid: u64,
    log: Vec<Recorded>,
    faults: Vec<Fault>,
    watchers: Vec<Watcher>,
    history: Vec<HistoryEntry>,
    /// When set, history and the request log are not kept (benchmarks with many writes).
    quiet: bool,
    /// When set, applied Deployments and StatefulSets become Available at once.
    auto_available: bool,
}

/// The fake API server; cheap to clone, every clone shares the store.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn respond(code: u16, body: &Value) -> Response<FakeBody> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed_unsync())
        .unwrap()
}

fn error(code: u16, reason: &str, message: &str) -> Response<FakeBody> {
    respond(code, &status_body(code, reason, message))
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_selector(query: &str) -> Vec<(String, String)> {
    query_param(query, "labelSelector")
        .map(percent_decode)
        .map(|s| {
            s.split(',')
                .filter_map(|term| {
                    let (k, v) = term.split_once("==").or_else(|| term.split_once('='))?;
                    Some((k.trim().to_string(), v.trim().to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn matches_selector(obj: &Value, selector: &[(String, String)]) -> bool {
    selector.iter().all(|(k, v)| {
        obj.pointer("/metadata/labels")
            .and_then(|l| l.get(k))
            .and_then(Value::as_str)
            == Some(v.as_str())
    })
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// RFC 6901 token escaping, so label keys with `/` stay one token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Leaf fields of a JSON value as (pointer, value); lists and empty objects count as leaves.
fn leaves(value: &Value, prefix: String, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaves(v, format!("{prefix}/{}", escape(k)), out);
            }
        }
        other => out.push((prefix, other.clone())),
    }
}

/// Fields the API server sets itself and never tracks as anyone's.
fn server_owned(path: &str) -> bool {
    const SERVER: [&str; 9] = [
        "/apiVersion",
        "/kind",
        "/metadata/name",
        "/metadata/namespace",
        "/metadata/uid",
        "/metadata/resourceVersion",
        "/metadata/generation",
        "/metadata/creationTimestamp",
        "/metadata/managedFields",
    ];
    SERVER
        .iter()
        .any(|s| path == *s || path.starts_with(&format!("{s}/")))
}

/// The fields of `value` a manager of `scope` ("" main resource, "status") can own.
fn owned_leaves(value: &Value, scope: &str) -> BTreeMap<String, Value> {
    let mut out = Vec::new();
    leaves(value, String::new(), &mut out);
    out.into_iter()
        .filter(|(p, _)| !server_owned(p))
        .filter(|(p, _)| in_scope(p, scope))
        .collect()
}

fn set_path(target: &mut Value, path: &str, value: Value) {
    let tokens: Vec<String> = path.split('/').skip(1).map(unescape).collect();
    let mut node = target;
    for token in &tokens[..tokens.len().saturating_sub(1)] {
        if !node.is_object() {
            *node = json!({});
        }
        node = node
            .as_object_mut()
            .unwrap()
            .entry(token.clone())
            .or_insert(json!({}));
        if !node.is_object() {
            *node = json!({});
        }
    }
    if let Some(last) = tokens.last() {
        if !node.is_object() {
            *node = json!({});
        }
        node.as_object_mut().unwrap().insert(last.clone(), value);
    }
}

/// Remove a field and the objects it leaves empty.
fn remove_path(target: &mut Value, path: &str) {
    fn go(node: &mut Value, tokens: &[String]) {
        let Some(map) = node.as_object_mut() else {
            return;
        };
        match tokens {
            [] => {}
            [last] => {
                map.remove(last);
            }
            [first, rest @ ..] => {
                if let Some(child) = map.get_mut(first) {
                    go(child, rest);
                    if child.as_object().is_some_and(|m| m.is_empty()) {
                        map.remove(first);
                    }
                }
            }
        }
    }
    let tokens: Vec<String> = path.split('/').skip(1).map(unescape).collect();
    go(target, &tokens);
}

/// `metadata.managedFields` as the API server renders them (FieldsV1 trees).
fn managed_fields(owners: &Owners, api_version: &Value) -> Value {
    let mut by_owner: BTreeMap<&OwnerId, Value> = BTreeMap::new();
    for (path, ids) in owners {
        for id in ids {
            let tree = by_owner.entry(id).or_insert(json!({}));
            let mut node = tree;
            for token in path.split('/').skip(1).map(unescape) {
                node = node
                    .as_object_mut()
                    .unwrap()
                    .entry(format!("f:{token}"))
                    .or_insert(json!({}));
            }
        }
    }
    Value::Array(
        by_owner
            .into_iter()
            .map(|((manager, operation, subresource), fields)| {
                let mut entry = json!({
                    "manager": manager, "operation": operation, "apiVersion": api_version,
                    "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": fields,
                });
                if !subresource.is_empty() {
                    entry["subresource"] = json!(subresource);
                }
                entry
            })
            .collect(),
    )
}

/// Ownership after an update by `id` from `old` to `new`: the fields it changed are its own
/// and nobody else's; fields it removed are nobody's.
fn update_owners(owners: &mut Owners, old: &Value, new: &Value, id: &OwnerId, scope: &str) {
    let before = owned_leaves(old, scope);
    let after = owned_leaves(new, scope);
    for (path, value) in &after {
        if before.get(path) != Some(value) {
            owners.insert(path.clone(), BTreeSet::from([id.clone()]));
        }
    }
    for path in before.keys().filter(|p| !after.contains_key(*p)) {
        owners.remove(path);
    }
    // Owned fields are leaves of the object; one replaced by an object (or the reverse)
    // leaves no stale owner behind.
    owners.retain(|path, ids| {
        !ids.is_empty() && (!in_scope(path, scope) || after.contains_key(path))
    });
}

fn in_scope(path: &str, scope: &str) -> bool {
    let status = path == "/status" || path.starts_with("/status/");
    (scope == "status") == status
}

/// A server-side apply of `patch` by `manager` over `existing`: the object and ownership
/// after it, or the conflict message.
fn apply_patch(
    existing: &Value,
    owners: &Owners,
    patch: &Value,
    manager: &str,
    scope: &str,
    force: bool,
) -> Result<(Value, Owners), String> {
    let id: OwnerId = (manager.to_string(), "Apply", scope.to_string());
    let wanted = owned_leaves(patch, scope);
    let mut next = existing.clone();
    let mut owners = owners.clone();
    if !force {
        // Worded as the API server words it: the manager, then the field as a dotted path.
        let conflicts: Vec<String> = wanted
            .iter()
            .filter(|(path, value)| existing.pointer(path) != Some(*value))
            .filter_map(|(path, _)| {
                let other = owners.get(path)?.iter().find(|o| o.0 != manager)?;
                let subresource = if other.2.is_empty() {
                    String::new()
                } else {
                    format!(" with subresource {:?}", other.2)
                };
                let field: String = path
                    .split('/')
                    .skip(1)
                    .map(|t| format!(".{}", unescape(t)))
                    .collect();
                Some(format!("conflict with {:?}{subresource}: {field}", other.0))
            })
            .collect();
        if !conflicts.is_empty() {
            return Err(format!(
                "Apply failed with {} conflict(s): {}",
                conflicts.len(),
                conflicts.join("\n")
            ));
        }
    }
    // Fields this applier owned and no longer applies: given up, and removed when nobody
    // else owns them.
    let given_up: Vec<String> = owners
        .iter()
        .filter(|(path, ids)| ids.contains(&id) && !wanted.contains_key(*path))
        .map(|(path, _)| path.clone())
        .collect();
    for path in given_up {
        let ids = owners.get_mut(&path).unwrap();
        ids.remove(&id);
        if ids.is_empty() {
            owners.remove(&path);
            remove_path(&mut next, &path);
        }
    }
    for (path, value) in wanted {
        let changed = next.pointer(&path) != Some(&value);
        set_path(&mut next, &path, value);
        let ids = owners.entry(path).or_default();
        // A changed value (forced, or unowned) is the applier's alone; an equal one is shared.
        if changed {
            ids.clear();
        }
        ids.insert(id.clone());
    }
    Ok((next, owners))
}

/// What the API server fills in or refuses on a write of `resource`.
fn defaults_and_validation(
    resource: &str,
    old: Option<&Value>,
    new: &mut Value,
    next_ip: &mut u32,
) -> Result<(), String> {
    match resource {
        "deployments" | "statefulsets" if new.pointer("/spec/replicas").is_none() => {
            set_path(new, "/spec/replicas", json!(1));
        }
        "services" => {
            let old_ip = old.and_then(|o| o.pointer("/spec/clusterIP")).cloned();
            match (old_ip, new.pointer("/spec/clusterIP").cloned()) {
                (Some(old), None) => set_path(new, "/spec/clusterIP", old),
                (Some(old), Some(ip)) if old != ip => {
                    return Err(format!(
                        "Service \"{}\" is invalid: spec.clusterIP: Invalid value: {ip}: field is immutable",
                        new.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
                    ))
                }
                (None, None) => {
                    *next_ip += 1;
                    set_path(new, "/spec/clusterIP", json!(format!("10.96.0.{next_ip}")));
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

fn kind_for(resource: &str, base: &str) -> String {
    match resource {
        "configmaps" => "ConfigMap".into(),
        "services" => "Service".into(),
        "deployments" => "Deployment".into(),
        "statefulsets" => "StatefulSet".into(),
        "poddisruptionbudgets" => "PodDisruptionBudget".into(),
        "horizontalpodautoscalers" => "HorizontalPodAutoscaler".into(),
        "networkpolicies" => "NetworkPolicy".into(),
        "secrets" => "Secret".into(),
        "leases" => "Lease".into(),
        "events" => "Event".into(),
        "orlyrelays" => "OrlyRelay".into(),
        other => format!("{other} in {base}"),
    }
}

fn api_version_of(base: &str) -> String {
    base.trim_start_matches("/apis/")
        .trim_start_matches("/api/")
        .to_string()
}

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, kind: &'static str, key: &Key, object: &Value) {
        let rv = self.rv;
        if !self.quiet {
            self.history.push(HistoryEntry {
                rv,
                key: key.clone(),
                kind,
                object: object.clone(),
            });
        }
        let mut bytes = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        bytes.push(b'\n');
        let bytes = Bytes::from(bytes);
        self.watchers.retain(|w| {
            let hit = w.base == key.0
                && w.resource == key.1
                && w.namespace.as_ref().is_none_or(|ns| *ns == key.2)
                && matches_selector(object, &w.selector);
            !hit || w.tx.send(bytes.clone()).is_ok()
        });
    }

    fn render_managed_fields(&self, key: &Key, obj: &mut Value) {
        let meta = obj["metadata"].as_object_mut().unwrap();
        match self.owners.get(key).filter(|o| !o.is_empty()) {
            Some(owners) => {
                let rendered = managed_fields(owners, &json!(api_version_of(&key.0)));
                meta.insert("managedFields".into(), rendered);
            }
            None => {
                meta.remove("managedFields");
            }
        }
    }

    /// Store a new object, filling the server-owned metadata; `owner` owns every field.
    fn create(
        &mut self,
        key: Key,
        mut obj: Value,
        owner: Option<OwnerId>,
    ) -> Result<Value, String> {
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        let mut ip = self.cluster_ips;
        defaults_and_validation(&key.1, None, &mut obj, &mut ip)?;
        self.cluster_ips = ip;
        let rv = self.next_rv();
        self.uid += 1;
        let meta = obj
            .as_object_mut()
            .unwrap()
            .entry("metadata")
            .or_insert(json!({}));
        meta["name"] = json!(key.3);
        if !key.2.is_empty() {
            meta["namespace"] = json!(key.2);
        }
        meta["uid"] = json!(format!("uid-{}", self.uid));
        meta["resourceVersion"] = json!(rv.to_string());
        meta["generation"] = json!(1);
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        if let Some(id) = owner {
            let mut owners = Owners::new();
            for scope in ["", "status"] {
                update_owners(&mut owners, &json!({}), &obj, &id, scope);
            }
            self.owners.insert(key.clone(), owners);
        }
        self.render_managed_fields(&key, &mut obj);
        self.objects.insert(key.clone(), obj.clone());
        self.emit("ADDED", &key, &obj);
        Ok(obj)
    }

    /// Store a changed object: bump resourceVersion, and generation when the spec changed.
    /// `owners` replaces the object's ownership when given.
    fn write(
        &mut self,
        key: &Key,
        mut obj: Value,
        owners: Option<Owners>,
    ) -> Result<Value, String> {
        let old = self.objects.get(key).cloned().unwrap_or(Value::Null);
        let mut ip = self.cluster_ips;
        defaults_and_validation(&key.1, Some(&old), &mut obj, &mut ip)?;
        self.cluster_ips = ip;
        if let Some(owners) = owners {
            self.owners.insert(key.clone(), owners);
        }
        let mut generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if old.get("spec") != obj.get("spec") {
            generation += 1;
        }
        for field in ["uid", "creationTimestamp", "name", "namespace"] {
            if let Some(v) = old.pointer(&format!("/metadata/{field}")) {
                obj["metadata"][field] = v.clone();
            }
        }
        // Like the API server, a write that changes nothing (a repeated server-side apply)
        // keeps the resourceVersion and sends no watch event.
        obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        obj["metadata"]["generation"] = json!(generation);
        self.render_managed_fields(key, &mut obj);
        if obj == old {
            return Ok(old);
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), obj.clone());
        self.emit("MODIFIED", key, &obj);
        Ok(obj)
    }

    /// A write by `id` (an update, not an apply): it owns what it changed.
    fn update_by(
        &mut self,
        key: &Key,
        obj: Value,
        id: Option<OwnerId>,
        scope: &str,
    ) -> Result<Value, String> {
        let owners = id.map(|id| {
            let old = self.objects.get(key).cloned().unwrap_or(Value::Null);
            let mut owners = self.owners.get(key).cloned().unwrap_or_default();
            update_owners(&mut owners, &old, &obj, &id, scope);
            owners
        });
        self.write(key, obj, owners)
    }

    /// A write outside any manager (a user edit through the test, a controller's status).
    fn update(&mut self, key: &Key, obj: Value) -> Value {
        self.write(key, obj, None).expect("test edits are valid")
    }

    fn make_available(&mut self, key: &Key) {
        let Some(mut value) = self.objects.get(key).cloned() else {
            return;
        };
        let replicas = value
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = value["metadata"]["generation"].clone();
        value["status"] = json!({
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "currentReplicas": replicas,
        });
        if self.objects.get(key) == Some(&value) {
            return;
        }
        let rv = self.next_rv();
        value["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), value.clone());
        self.emit("MODIFIED", key, &value);
    }

    /// With `auto_available`, a written workload is reported Available at once.
    fn after_write(&mut self, key: &Key) {
        if self.auto_available && matches!(key.1.as_str(), "deployments" | "statefulsets") {
            self.make_available(key);
        }
    }

    fn take_fault(&mut self, method: &Method, path: &str) -> Option<(u16, String)> {
        let fault = self
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method == *method && path.ends_with(&f.path))?;
        fault.remaining -= 1;
        Some((fault.code, fault.reason.clone()))
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keep no watch history and no request log, to bound memory in benchmarks.
    pub fn quiet(self) -> Self {
        self.state.lock().unwrap().quiet = true;
        self
    }

    /// Play instant workload controllers: every applied Deployment or StatefulSet is
    /// reported Available right away.
    pub fn auto_available(self) -> Self {
        self.state.lock().unwrap().auto_available = true;
        self
    }

    /// A kube client whose every request this fake answers.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<FakeBody>>();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = fake.handle(request).await;
                send.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().log.clone()
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        self.state.lock().unwrap().log.clear();
    }

    /// Make the next `times` requests with `method` to a path ending in `path` fail.
    pub fn fail(&self, method: Method, path: &str, code: u16, reason: &str, times: usize) {
        self.state.lock().unwrap().faults.push(Fault {
            method,
            path: path.to_string(),
            code,
            reason: reason.to_string(),
            remaining: times,
        });
    }

    fn key_of<K: Resource<DynamicType = ()>>(namespace: &str, name: &str) -> Key {
        let url = K::url_path(&(), Some(namespace));
        let target = parse_path(&url).expect("resource url parses");
        (
            target.base,
            target.resource,
            target.namespace.unwrap_or_default(),
            name.to_string(),
        )
    }

    /// Store `obj` as if a client had created it.
    pub fn insert<K>(&self, obj: &K) -> K
    where
        K: Resource<DynamicType = ()> + serde::Serialize + DeserializeOwned,
    {
        let meta = obj.meta();
        let key = Self::key_of::<K>(
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        );
        let mut value = serde_json::to_value(obj).unwrap();
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        let stored = self.state.lock().unwrap().create(key, value, None);
        serde_json::from_value(stored.expect("valid object")).unwrap()
    }

    /// Store raw JSON as kind `K`, bypassing any schema (objects from older CRD versions).
    pub fn insert_json<K: Resource<DynamicType = ()>>(&self, mut value: Value) -> Value {
        let key = Self::key_of::<K>(
            value
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            value
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        self.state
            .lock()
            .unwrap()
            .create(key, value, None)
            .expect("valid object")
    }

    /// The stored object, typed.
    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let key = Self::key_of::<K>(namespace, name);
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&key)
            .map(|v| serde_json::from_value(v.clone()).expect("stored object deserializes"))
    }

    /// The stored object as JSON.
    pub fn get_json<K: Resource<DynamicType = ()>>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let key = Self::key_of::<K>(namespace, name);
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Names of the stored objects of kind `K` in `namespace`, sorted.
    pub fn names<K: Resource<DynamicType = ()>>(&self, namespace: &str) -> Vec<String> {
        let (base, resource, ns, _) = Self::key_of::<K>(namespace, "");
        let state = self.state.lock().unwrap();
        state
            .objects
            .keys()
            .filter(|k| k.0 == base && k.1 == resource && k.2 == ns)
            .map(|k| k.3.clone())
            .collect()
    }

    /// Every stored object of kind `K`, in every namespace, as JSON (to fill a cache).
    pub fn all_json<K: Resource<DynamicType = ()>>(&self) -> Vec<Value> {
        let (base, resource, _, _) = Self::key_of::<K>("", "");
        let state = self.state.lock().unwrap();
        state
            .objects
            .iter()
            .filter(|(k, _)| k.0 == base && k.1 == resource)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The managers owning `spec.replicas` of a stored object.
    pub fn replicas_owners<K: Resource<DynamicType = ()>>(
        &self,
        namespace: &str,
        name: &str,
    ) -> Vec<String> {
        let key = Self::key_of::<K>(namespace, name);
        let state = self.state.lock().unwrap();
        state
            .owners
            .get(&key)
            .and_then(|o| o.get("/spec/replicas"))
            .map(|ids| ids.iter().map(|id| id.0.clone()).collect())
            .unwrap_or_default()
    }

    /// Number of stored objects.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().objects.len()
    }

    /// Edit a stored object like a user would (generation bumps when the spec changes).
    pub fn edit<K>(&self, namespace: &str, name: &str, f: impl FnOnce(&mut Value))
    where
        K: Resource<DynamicType = ()>,
    {
        let key = Self::key_of::<K>(namespace, name);
        let mut state = self.state.lock().unwrap();
        let mut value = state.objects.get(&key).cloned().expect("object exists");
        f(&mut value);
        state.update(&key, value);
    }

    /// Delete a stored object like a user would.
    pub fn remove<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) {
        let key = Self::key_of::<K>(namespace, name);
        let mut state = self.state.lock().unwrap();
        if let Some(obj) = state.objects.remove(&key) {
            state.next_rv();
            state.emit("DELETED", &key, &obj);
        }
    }

    /// Play the workload controller: report every desired replica of a Deployment or
    /// StatefulSet as updated, ready and available for the current generation.
    pub fn mark_available<K: Resource<DynamicType = ()>>(&self, namespace: &str, name: &str) {
        let key = Self::key_of::<K>(namespace, name);
        let mut state = self.state.lock().unwrap();
        assert!(state.objects.contains_key(&key), "{name} exists");
        state.make_available(&key);
    }

    async fn handle(&self, request: Request<Body>) -> Response<FakeBody> {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default().to_string();
        let content_type = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let mut state = self.state.lock().unwrap();
        if !state.quiet {
            state.log.push(Recorded {
                method: parts.method.clone(),
                path: path.clone(),
                query: query.clone(),
                body: body.clone(),
            });
        }
        if let Some((code, reason)) = state.take_fault(&parts.method, &path) {
            return error(code, &reason, &format!("injected {code} {reason}"));
        }
        let Some(target) = parse_path(&path) else {
            return error(404, "NotFound", &format!("no route {path}"));
        };
        let ns = target.namespace.clone().unwrap_or_default();
        let manager = query_param(&query, "fieldManager").map(percent_decode);
        let force = query_param(&query, "force") == Some("true");
        let scope = match target.subresource.as_deref() {
            Some("status") => "status",
            _ => "",
        };
        // Updates without a field manager are recorded under a name, as the API server
        // records them under the client's user agent.
        let updater = |subresource: &str| -> OwnerId {
            (
                manager.clone().unwrap_or_else(|| "unknown".into()),
                "Update",
                subresource.to_string(),
            )
        };

        if target.subresource.as_deref() == Some("scale") {
            let Some(name) = &target.name else {
                return error(405, "MethodNotAllowed", &path);
            };
            let key = (
                target.base.clone(),
                target.resource.clone(),
                ns,
                name.clone(),
            );
            let Some(existing) = state.objects.get(&key).cloned() else {
                return error(404, "NotFound", &format!("{name} not found"));
            };
            if parts.method != Method::GET {
                let Some(patch) = body else {
                    return error(400, "BadRequest", "no body");
                };
                let Some(replicas) = patch.pointer("/spec/replicas").cloned() else {
                    return error(422, "Invalid", "a Scale needs spec.replicas");
                };
                let mut next = existing.clone();
                set_path(&mut next, "/spec/replicas", replicas);
                if let Err(message) = state.update_by(&key, next, Some(updater("scale")), "") {
                    return error(422, "Invalid", &message);
                }
            }
            let object = state.objects.get(&key).cloned().unwrap_or_default();
            let scale = json!({
                "apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": name, "namespace": object["metadata"]["namespace"],
                             "resourceVersion": object["metadata"]["resourceVersion"]},
                "spec": {"replicas": object.pointer("/spec/replicas").cloned().unwrap_or(json!(0))},
                "status": {"replicas": object.pointer("/status/replicas").cloned().unwrap_or(json!(0))},
            });
            return respond(200, &scale);
        }

        match (&parts.method, &target.name) {
            (&Method::GET, Some(name)) => {
                let key = (target.base, target.resource, ns, name.clone());
                match state.objects.get(&key) {
                    Some(obj) => respond(200, obj),
                    None => error(404, "NotFound", &format!("{name} not found")),
                }
            }
            (&Method::GET, None) => {
                let selector = parse_selector(&query);
                let matching = |k: &Key, v: &Value| {
                    k.0 == target.base
                        && k.1 == target.resource
                        && target.namespace.as_ref().is_none_or(|n| *n == k.2)
                        && matches_selector(v, &selector)
                };
                if matches!(query_param(&query, "watch"), Some("true" | "1")) {
                    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                    let since: u64 = query_param(&query, "resourceVersion")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(state.rv);
                    for entry in state.history.iter().filter(|e| e.rv > since) {
                        if matching(&entry.key, &entry.object) {
                            let mut bytes = serde_json::to_vec(
                                &json!({"type": entry.kind, "object": entry.object}),
                            )
                            .unwrap();
                            bytes.push(b'\n');
                            let _ = tx.send(Bytes::from(bytes));
                        }
                    }
                    state.watchers.push(Watcher {
                        base: target.base.clone(),
                        resource: target.resource.clone(),
                        namespace: target.namespace.clone(),
                        selector,
                        tx,
                    });
                    let stream = futures::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                    });
                    return Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(StreamBody::new(stream).boxed_unsync())
                        .unwrap();
                }
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(k, v)| matching(k, v))
                    .map(|(_, v)| v.clone())
                    .collect();
                respond(
                    200,
                    &json!({
                        "apiVersion": api_version_of(&target.base),
                        "kind": format!("{}List", kind_for(&target.resource, &target.base)),
                        "metadata": {"resourceVersion": state.rv.to_string()},
                        "items": items,
                    }),
                )
            }
            (&Method::POST, None) => {
                let Some(mut obj) = body else {
                    return error(400, "BadRequest", "no body");
                };
                let name = match obj.pointer("/metadata/name").and_then(Value::as_str) {
                    Some(n) => n.to_string(),
                    None => {
                        let prefix = obj
                            .pointer("/metadata/generateName")
                            .and_then(Value::as_str)
                            .unwrap_or("obj-")
                            .to_string();
                        format!("{prefix}{}", state.rv + 1)
                    }
                };
                obj["metadata"]["name"] = json!(name);
                let key = (target.base, target.resource, ns, name.clone());
                if state.objects.contains_key(&key) {
                    return error(409, "AlreadyExists", &format!("{name} already exists"));
                }
                match state.create(key, obj, Some(updater(""))) {
                    Ok(created) => respond(201, &created),
                    Err(message) => error(422, "Invalid", &message),
                }
            }
            (&Method::PUT, Some(name)) => {
                let Some(mut obj) = body else {
                    return error(400, "BadRequest", "no body");
                };
                let key = (target.base, target.resource, ns, name.clone());
                let Some(existing) = state.objects.get(&key).cloned() else {
                    return error(404, "NotFound", &format!("{name} not found"));
                };
                if let Some(rv) = obj.pointer("/metadata/resourceVersion") {
                    if Some(rv) != existing.pointer("/metadata/resourceVersion") {
                        return error(409, "Conflict", "the object has been modified");
                    }
                }
                // A put of one part leaves the other: status through /status, the rest else.
                if scope == "status" {
                    let mut next = existing.clone();
                    next["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
                    obj = next;
                } else if let Some(status) = existing.get("status") {
                    obj["status"] = status.clone();
                }
                match state.update_by(&key, obj, Some(updater(scope)), scope) {
                    Ok(updated) => respond(200, &updated),
                    Err(message) => error(422, "Invalid", &message),
                }
            }
            (&Method::PATCH, Some(name)) => {
                let Some(patch) = body else {
                    return error(400, "BadRequest", "no body");
                };
                let key = (target.base, target.resource, ns, name.clone());
                let existing = state.objects.get(&key).cloned();
                if content_type.starts_with("application/apply-patch") {
                    let manager = manager.clone().unwrap_or_else(|| "unknown".into());
                    let Some(existing) = existing else {
                        if scope == "status" {
                            return error(404, "NotFound", &format!("{name} not found"));
                        }
                        let id: OwnerId = (manager, "Apply", String::new());
                        let mut patch = patch;
                        patch.as_object_mut().map(|o| o.remove("status"));
                        return match state.create(key.clone(), patch, Some(id)) {
                            Ok(created) => {
                                state.after_write(&key);
                                let created = state.objects.get(&key).cloned().unwrap_or(created);
                                respond(201, &created)
                            }
                            Err(message) => error(422, "Invalid", &message),
                        };
                    };
                    let owners = state.owners.get(&key).cloned().unwrap_or_default();
                    let (next, owners) =
                        match apply_patch(&existing, &owners, &patch, &manager, scope, force) {
                            Ok(result) => result,
                            Err(message) => return error(409, "Conflict", &message),
                        };
                    match state.write(&key, next, Some(owners)) {
                        Ok(updated) => {
                            state.after_write(&key);
                            let updated = state.objects.get(&key).cloned().unwrap_or(updated);
                            respond(200, &updated)
                        }
                        Err(message) => error(422, "Invalid", &message),
                    }
                } else {
                    let Some(mut next) = existing else {
                        return error(404, "NotFound", &format!("{name} not found"));
                    };
                    if let Some(rv) = patch.pointer("/metadata/resourceVersion") {
                        if Some(rv) != next.pointer("/metadata/resourceVersion") {
                            return error(409, "Conflict", "the object has been modified");
                        }
                    }
                    if scope == "status" {
                        let mut status = next.get("status").cloned().unwrap_or(json!({}));
                        merge_patch(&mut status, patch.get("status").unwrap_or(&Value::Null));
                        next["status"] = status;
                    } else {
                        merge_patch(&mut next, &patch);
                    }
                    match state.update_by(&key, next, Some(updater(scope)), scope) {
                        Ok(updated) => respond(200, &updated),
                        Err(message) => error(422, "Invalid", &message),
                    }
                }
            }
            (&Method::DELETE, Some(name)) => {
                let key = (target.base, target.resource, ns, name.clone());
                match state.objects.remove(&key) {
                    Some(obj) => {
                        state.owners.remove(&key);
                        state.next_rv();
                        state.emit("DELETED", &key, &obj);
                        respond(200, &obj)
                    }
                    None => error(404, "NotFound", &format!("{name} not found")),
                }
            }
            _ => error(405, "MethodNotAllowed", &format!("{} {path}", parts.method)),
        }
    }
}
