//! What happens to an object between the request body and the store:
//! type checking against k8s-openapi, metadata the server owns, defaults,
//! validation (422), address allocation, and the rules of updates
//! (immutable fields, status kept apart from spec, generation). Pod
//! Security (`pod_security`) judges what is left before it is stored.

mod allocate;
pub mod defaults;
pub mod pod_security;
pub mod validate;

use std::collections::HashSet;
use std::net::Ipv4Addr;

use rand::Rng;
use serde_json::{Value, json};

use super::resources::Resource;
use super::status::{ApiError, ApiResult, Cause};
use crate::store::Store;

/// How unknown fields are treated (`?fieldValidation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn from_query(v: Option<&str>) -> Self {
        match v {
            Some("Strict") => Self::Strict,
            Some("Ignore") => Self::Ignore,
            _ => Self::Warn,
        }
    }
}

/// Checks `body` against the resource's k8s-openapi type; returns warnings
/// for unknown fields (or a 400 under `Strict`).
pub fn check_typed(res: &Resource, body: &Value, mode: FieldValidation) -> ApiResult<Vec<String>> {
    let known = (res.typed)(body).map_err(|e| {
        ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {e}",
            res.kind, res.version, res.kind
        ))
    })?;
    if mode == FieldValidation::Ignore {
        return Ok(Vec::new());
    }
    let mut unknown = Vec::new();
    unknown_fields(body, &known, "", &mut unknown);
    let warnings: Vec<String> = unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
    if mode == FieldValidation::Strict && !warnings.is_empty() {
        return Err(ApiError::bad_request(format!("strict decoding error: {}", warnings.join(", "))));
    }
    Ok(warnings)
}

/// Paths present (and not null) in `input` that the typed round trip dropped.
fn unknown_fields(input: &Value, known: &Value, at: &str, out: &mut Vec<String>) {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => {
            for (key, v) in i {
                let here = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
                match k.get(key) {
                    None if !v.is_null() => out.push(here),
                    None => {}
                    Some(kv) => unknown_fields(v, kv, &here, out),
                }
            }
        }
        (Value::Array(i), Value::Array(k)) => {
            for (n, (iv, kv)) in i.iter().zip(k).enumerate() {
                unknown_fields(iv, kv, &format!("{at}[{n}]"), out);
            }
        }
        _ => {}
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// The 5-character suffix of generated names (no vowels, as Kubernetes).
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Prepares a new object for the store. `namespace` comes from the URL.
pub fn prepare_create(res: &Resource, namespace: &str, mut obj: Value, store: &Store) -> ApiResult<Value> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    }
    obj["kind"] = json!(res.kind);
    obj["apiVersion"] = json!(res.api_version());
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    let meta = &mut obj["metadata"];
    if meta.get("name").and_then(Value::as_str).is_none_or(str::is_empty)
        && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
    {
        meta["name"] = json!(format!("{prefix}{}", name_suffix()));
    }
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    if res.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() && ns != namespace => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => meta["namespace"] = json!(namespace),
        }
    } else if let Some(m) = meta.as_object_mut() {
        m.remove("namespace");
    }
    if let Some(m) = meta.as_object_mut() {
        for server_owned in ["resourceVersion", "deletionTimestamp", "managedFields", "selfLink"] {
            m.remove(server_owned);
        }
        m.insert("uid".into(), json!(uid()));
        m.insert("creationTimestamp".into(), json!(now()));
        m.insert("generation".into(), json!(1));
    }
    if name.is_empty() {
        let cause = Cause {
            reason: "FieldValueRequired",
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        };
        return Err(ApiError::invalid(res.group, res.kind, "", vec![cause]));
    }
    apply_kind_rules(res, &mut obj, None, store)?;
    Ok(obj)
}

/// Prepares an update of `old` to `new`, for the object or its `status`.
pub fn prepare_update(
    res: &Resource,
    old: &Value,
    mut new: Value,
    status_only: bool,
    store: &Store,
) -> ApiResult<Value> {
    if !new.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON object"));
    }
    let name = old["metadata"]["name"].as_str().unwrap_or_default();
    match new.pointer("/metadata/name").and_then(Value::as_str) {
        Some(n) if n != name => {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        _ => {}
    }
    if status_only {
        let mut out = old.clone();
        out["status"] = new.get("status").cloned().unwrap_or(json!({}));
        return Ok(out);
    }
    new["kind"] = old["kind"].clone();
    new["apiVersion"] = old["apiVersion"].clone();
    if !new.get("metadata").is_some_and(Value::is_object) {
        new["metadata"] = json!({});
    }
    for owned in ["name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"] {
        match old["metadata"].get(owned) {
            Some(v) => new["metadata"][owned] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(owned);
                }
            }
        }
    }
    if res.has_status() {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    apply_kind_rules(res, &mut new, Some(old), store)?;
    if new.get("spec") != old.get("spec") {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    Ok(new)
}

/// Defaults, validation and allocation by kind.
fn apply_kind_rules(res: &Resource, obj: &mut Value, old: Option<&Value>, store: &Store) -> ApiResult<()> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let mut causes = validate::name(&name, matches!(res.kind, "Namespace" | "Service"));
    match res.kind {
        "Pod" => {
            defaults::pod(obj);
            causes.extend(validate::pod_spec(&obj["spec"], "spec"));
            match old {
                None => obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"}),
                Some(old) => causes.extend(pod_update(old, obj)),
            }
        }
        "Deployment" | "ReplicaSet" => {
            if res.kind == "Deployment" {
                defaults::deployment(obj)
            } else {
                defaults::replicaset(obj)
            }
            causes.extend(validate::workload(obj));
            if old.is_none() {
                obj["status"] = json!({});
            }
            if let Some(old) = old
                && old.pointer("/spec/selector") != obj.pointer("/spec/selector")
            {
                causes.push(Cause::invalid("spec.selector", &obj["spec"]["selector"], "field is immutable"));
            }
        }
        "Service" => {
            defaults::service(obj);
            causes.extend(validate::service(obj));
            if causes.is_empty() {
                allocate_service(obj, old, store, &mut causes);
            }
            if old.is_none() {
                obj["status"] = json!({"loadBalancer": {}});
            }
        }
        "Namespace" => {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            if old.is_none() {
                obj["status"] = json!({"phase": "Active"});
            }
        }
        "Secret" => secret_string_data(obj),
        _ => {}
    }
    if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(res.group, res.kind, &name, causes)) }
}

/// A pod's spec may only change its images (and a few scheduling fields).
fn pod_update(old: &Value, new: &Value) -> Vec<Cause> {
    let without_images = |spec: &Value| {
        let mut s = spec.clone();
        for field in ["containers", "initContainers"] {
            for c in s.get_mut(field).and_then(Value::as_array_mut).into_iter().flatten() {
                c["image"] = Value::Null;
            }
        }
        for mutable in ["activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"] {
            if let Some(m) = s.as_object_mut() {
                m.remove(mutable);
            }
        }
        s
    };
    if without_images(&old["spec"]) == without_images(&new["spec"]) {
        return Vec::new();
    }
    vec![Cause::forbidden(
        "spec",
        "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
    )]
}

/// `stringData` is write-only: it is folded into `data`, base64-encoded.
fn secret_string_data(obj: &mut Value) {
    use base64::Engine;
    let Some(Value::Object(strings)) = obj.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    if !obj.get("data").is_some_and(Value::is_object) {
        obj["data"] = json!({});
    }
    for (k, v) in strings {
        let encoded = base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or_default());
        obj["data"][k] = json!(encoded);
    }
    if obj.get("type").is_none() {
        obj["type"] = json!("Opaque");
    }
}

fn allocate_service(obj: &mut Value, old: Option<&Value>, store: &Store, causes: &mut Vec<Cause>) {
    let (services, _) = store.list("services", None);
    let uid = obj["metadata"]["uid"].clone();
    let others = services.iter().filter(|s| s["metadata"]["uid"] != uid);
    let mut ips: HashSet<Ipv4Addr> = HashSet::new();
    let mut node_ports: HashSet<u16> = HashSet::new();
    for s in others {
        if let Some(ip) = s.pointer("/spec/clusterIP").and_then(Value::as_str).and_then(|i| i.parse().ok()) {
            ips.insert(ip);
        }
        for p in s.pointer("/spec/ports").and_then(Value::as_array).into_iter().flatten() {
            if let Some(n) = p["nodePort"].as_u64().and_then(|n| u16::try_from(n).ok()) {
                node_ports.insert(n);
            }
        }
    }
    let spec = &mut obj["spec"];
    if spec["type"] == "ExternalName" {
        return;
    }
    let old_ip = old.and_then(|o| o.pointer("/spec/clusterIP")).and_then(Value::as_str);
    let requested = spec.get("clusterIP").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    match (old_ip, requested.as_deref()) {
        (Some(o), Some(r)) if o != r => {
            causes.push(Cause::invalid("spec.clusterIPs[0]", &json!(r), "may not change once set"));
            return;
        }
        (Some(o), _) => spec["clusterIP"] = json!(o),
        (None, Some("None")) => {}
        (None, req) => match allocate::cluster_ip(req, &ips) {
            Ok(ip) => spec["clusterIP"] = json!(ip.to_string()),
            Err(c) => {
                causes.push(c);
                return;
            }
        },
    }
    spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
    if spec["type"] == "NodePort" || spec["type"] == "LoadBalancer" {
        keep_old_node_ports(spec, old);
        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut)
            && let Err(c) = allocate::node_ports(ports, &node_ports)
        {
            causes.push(c);
        }
    }
}

/// An update that omits a port's nodePort keeps the one it had.
fn keep_old_node_ports(spec: &mut Value, old: Option<&Value>) {
    let old_ports = old.and_then(|o| o.pointer("/spec/ports")).and_then(Value::as_array).cloned().unwrap_or_default();
    for p in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
        if p.get("nodePort").is_none_or(|n| n.is_null() || n == 0)
            && let Some(o) = old_ports.iter().find(|o| o["port"] == p["port"] && o["protocol"] == p["protocol"])
        {
            p["nodePort"] = o["nodePort"].clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::by_kind;

    #[test]
    fn unknown_fields_warn_or_fail() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "bogus": 1}, "data": {"a": "b"}, "extra": null});
        let w = check_typed(by_kind("ConfigMap"), &cm, FieldValidation::Warn).unwrap();
        assert_eq!(w, ["unknown field \"metadata.bogus\""]);
        assert_eq!(check_typed(by_kind("ConfigMap"), &cm, FieldValidation::Strict).unwrap_err().code, 400);
        let bad = json!({"metadata": {"name": "c"}, "data": {"a": 1}});
        assert_eq!(check_typed(by_kind("ConfigMap"), &bad, FieldValidation::Ignore).unwrap_err().code, 400);
    }

    #[test]
    fn create_stamps_metadata_and_allocates_a_cluster_ip() {
        let store = Store::new();
        let svc = json!({"metadata": {"name": "hello"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "x"}}});
        let out = prepare_create(by_kind("Service"), "default", svc, &store).unwrap();
        assert_eq!(out["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(out["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(out["metadata"]["namespace"], "default");
        assert_eq!(out["metadata"]["uid"].as_str().map(str::len), Some(36));
        let bad = json!({"metadata": {"name": "bad"}, "spec": {"clusterIP": "10.0.0.5", "ports": [{"port": 80}]}});
        let err = prepare_create(by_kind("Service"), "default", bad, &store).unwrap_err();
        assert_eq!(err.code, 422);
    }

    #[test]
    fn updates_keep_status_and_bump_generation_on_spec_change() {
        let store = Store::new();
        let d = json!({"metadata": {"name": "d"}, "spec": {"selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let res = by_kind("Deployment");
        let mut created = prepare_create(res, "default", d, &store).unwrap();
        created["status"] = json!({"replicas": 1});
        let mut edit = created.clone();
        edit["spec"]["replicas"] = json!(3);
        edit["status"] = json!({});
        let updated = prepare_update(res, &created, edit, false, &store).unwrap();
        assert_eq!(updated["status"], json!({"replicas": 1}));
        assert_eq!(updated["metadata"]["generation"], 2);
        let mut sel = created.clone();
        sel["spec"]["selector"] = json!({"matchLabels": {"a": "c"}});
        sel["spec"]["template"]["metadata"]["labels"] = json!({"a": "c"});
        assert_eq!(prepare_update(res, &created, sel, false, &store).unwrap_err().code, 422);
    }
}
