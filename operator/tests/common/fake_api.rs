//! An in-memory Kubernetes API server behind a `tower-test` mock service: it stores objects,
//! answers get/list/watch/create/patch/put/delete like the API server does for what the
//! operator and kube-lease-manager use (server-side apply with field-owner conflicts, merge
//! patches, status subresource, generation and resourceVersion, label selectors, watch replay),
//! records every request for assertions and injects faults on demand.

#![allow(dead_code)] // each test binary uses a different part of the fake

use std::collections::{BTreeMap, HashMap};
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

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    owners: HashMap<Key, BTreeMap<String, String>>,
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

/// Leaf paths of a JSON value (`/spec/holderIdentity` ...); lists count as leaves.
fn leaves(value: &Value, prefix: String, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaves(v, format!("{prefix}/{k}"), out);
            }
        }
        other => out.push((prefix, other.clone())),
    }
}

fn kind_for(resource: &str, base: &str) -> String {
    match resource {
        "configmaps" => "ConfigMap".into(),
        "services" => "Service".into(),
        "deployments" => "Deployment".into(),
        "statefulsets" => "StatefulSet".into(),
        "poddisruptionbudgets" => "PodDisruptionBudget".into(),
        "horizontalpodautoscalers" => "HorizontalPodAutoscaler".into(),
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

    /// Store a new object, filling the server-owned metadata.
    fn create(&mut self, key: Key, mut obj: Value, manager: Option<&str>) -> Value {
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
        if let Some(manager) = manager {
            let mut owned = Vec::new();
            leaves(&obj, String::new(), &mut owned);
            let owners = self.owners.entry(key.clone()).or_default();
            for (path, _) in owned {
                owners.insert(path, manager.to_string());
            }
        }
        self.objects.insert(key.clone(), obj.clone());
        self.emit("ADDED", &key, &obj);
        obj
    }

    /// Store a changed object: bump resourceVersion, and generation when the spec changed.
    fn update(&mut self, key: &Key, mut obj: Value) -> Value {
        let old = self.objects.get(key).cloned().unwrap_or(Value::Null);
        let rv = self.next_rv();
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
        if obj == old {
            self.rv -= 1;
            return old;
        }
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.insert(key.clone(), obj.clone());
        self.emit("MODIFIED", key, &obj);
        obj
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
        serde_json::from_value(stored).unwrap()
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
        self.state.lock().unwrap().create(key, value, None)
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
                let created = state.create(key, obj, manager.as_deref());
                respond(201, &created)
            }
            (&Method::PUT, Some(name)) => {
                let Some(obj) = body else {
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
                let updated = state.update(&key, obj);
                respond(200, &updated)
            }
            (&Method::PATCH, Some(name)) => {
                let Some(patch) = body else {
                    return error(400, "BadRequest", "no body");
                };
                let key = (target.base, target.resource, ns, name.clone());
                let status_only = target.subresource.as_deref() == Some("status");
                let existing = state.objects.get(&key).cloned();
                if content_type.starts_with("application/apply-patch") {
                    let manager = manager.unwrap_or_else(|| "unknown".into());
                    let Some(existing) = existing else {
                        if status_only {
                            return error(404, "NotFound", &format!("{name} not found"));
                        }
                        let created = state.create(key.clone(), patch, Some(&manager));
                        state.after_write(&key);
                        let created = state.objects.get(&key).cloned().unwrap_or(created);
                        return respond(201, &created);
                    };
                    if !force {
                        let mut wanted = Vec::new();
                        leaves(&patch, String::new(), &mut wanted);
                        let owners = state.owners.get(&key).cloned().unwrap_or_default();
                        for (path, value) in &wanted {
                            let other = owners.get(path).filter(|m| **m != manager);
                            if let Some(other) = other {
                                if existing.pointer(path) != Some(value) {
                                    return error(
                                        409,
                                        "Conflict",
                                        &format!("Apply failed with 1 conflict: conflict with {other:?}: {path}"),
                                    );
                                }
                            }
                        }
                    }
                    let mut next = existing.clone();
                    if status_only {
                        next["status"] = patch.get("status").cloned().unwrap_or(Value::Null);
                    } else {
                        // The applied configuration replaces what this manager set before;
                        // status and server-owned metadata stay.
                        let mut applied = patch.clone();
                        if let Some(status) = existing.get("status") {
                            applied["status"] = status.clone();
                        }
                        next = applied;
                    }
                    let mut owned = Vec::new();
                    leaves(&patch, String::new(), &mut owned);
                    let owners = state.owners.entry(key.clone()).or_default();
                    for (path, _) in owned {
                        owners.insert(path, manager.clone());
                    }
                    let updated = state.update(&key, next);
                    state.after_write(&key);
                    let updated = state.objects.get(&key).cloned().unwrap_or(updated);
                    respond(200, &updated)
                } else {
                    let Some(mut next) = existing else {
                        return error(404, "NotFound", &format!("{name} not found"));
                    };
                    if let Some(rv) = patch.pointer("/metadata/resourceVersion") {
                        if Some(rv) != next.pointer("/metadata/resourceVersion") {
                            return error(409, "Conflict", "the object has been modified");
                        }
                    }
                    if status_only {
                        let mut status = next.get("status").cloned().unwrap_or(json!({}));
                        merge_patch(&mut status, patch.get("status").unwrap_or(&Value::Null));
                        next["status"] = status;
                    } else {
                        merge_patch(&mut next, &patch);
                    }
                    let mut touched = Vec::new();
                    leaves(&patch, String::new(), &mut touched);
                    let owners = state.owners.entry(key.clone()).or_default();
                    for (path, value) in touched {
                        if value.is_null() {
                            owners.remove(&path);
                        } else if let Some(m) = &manager {
                            owners.insert(path, m.clone());
                        }
                    }
                    let updated = state.update(&key, next);
                    respond(200, &updated)
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
