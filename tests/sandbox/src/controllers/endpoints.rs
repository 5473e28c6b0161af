//! The Endpoints and EndpointSlice controllers: for every Service with a
//! selector, the addresses of its pods (ready ones in `addresses`, the others
//! in `notReadyAddresses`) and its target ports, named ports resolved per
//! pod; the same as one EndpointSlice (what `kubectl describe service` reads).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::objects::{name, namespace, pod_active, pod_ready, uid};
use crate::api::admission::FieldValidation;
use crate::api::registry::Registry;
use crate::api::resources::by_kind;
use crate::api::selectors::LabelSelector;

/// The port a Service port targets on one pod (`None`: the pod lacks that named port).
fn target_port(svc_port: &Value, pod: &Value) -> Option<i64> {
    match &svc_port["targetPort"] {
        Value::Number(n) => n.as_i64(),
        Value::String(port_name) => pod
            .pointer("/spec/containers")?
            .as_array()?
            .iter()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .find(|p| p["name"] == port_name.as_str())
            .and_then(|p| p["containerPort"].as_i64()),
        _ => svc_port["port"].as_i64(),
    }
}

/// Pods serving the same ports: (ports, ready addresses, unready addresses).
type PortGroup = (Vec<Value>, Vec<Value>, Vec<Value>);

/// The Endpoints `subsets` of a Service given the pods of its namespace.
pub fn subsets(svc: &Value, pods: &[Value]) -> Vec<Value> {
    let selector = LabelSelector::from_map(&svc["spec"]["selector"]);
    let svc_ports = svc.pointer("/spec/ports").and_then(Value::as_array).cloned().unwrap_or_default();
    // Pods grouped by the ports they serve, as the real controller groups subsets.
    let mut groups: BTreeMap<String, PortGroup> = BTreeMap::new();
    for pod in pods.iter().filter(|p| pod_active(p) && selector.matches(p)) {
        let Some(ip) = pod.pointer("/status/podIP").and_then(Value::as_str).filter(|ip| !ip.is_empty()) else {
            continue;
        };
        let ports: Vec<Value> = svc_ports
            .iter()
            .filter_map(|sp| {
                let port = target_port(sp, pod)?;
                let mut p = json!({"port": port, "protocol": sp["protocol"].as_str().unwrap_or("TCP")});
                if let Some(n) = sp.get("name").filter(|n| n.as_str().is_some_and(|s| !s.is_empty())) {
                    p["name"] = n.clone();
                }
                Some(p)
            })
            .collect();
        let address = json!({
            "ip": ip,
            "nodeName": pod["spec"]["nodeName"],
            "targetRef": {"kind": "Pod", "namespace": namespace(pod), "name": name(pod), "uid": uid(pod)},
        });
        let entry = groups
            .entry(serde_json::to_string(&ports).unwrap_or_default())
            .or_insert_with(|| (ports, Vec::new(), Vec::new()));
        if pod_ready(pod) { entry.1.push(address) } else { entry.2.push(address) }
    }
    groups
        .into_values()
        .map(|(ports, mut ready, mut not_ready)| {
            let by_ip = |a: &Value| a["ip"].as_str().unwrap_or_default().to_owned();
            ready.sort_by_key(by_ip);
            not_ready.sort_by_key(by_ip);
            let mut subset = json!({"ports": ports});
            if !ready.is_empty() {
                subset["addresses"] = json!(ready);
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(not_ready);
            }
            subset
        })
        .collect()
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The EndpointSlice of a Service, from its Endpoints subsets (one slice,
/// with the ports of the first subset).
pub fn slice_endpoints(subsets: &[Value]) -> (Vec<Value>, Value) {
    let mut endpoints = Vec::new();
    for subset in subsets {
        for (field, ready) in [("addresses", true), ("notReadyAddresses", false)] {
            for a in subset.get(field).and_then(Value::as_array).into_iter().flatten() {
                endpoints.push(json!({
                    "addresses": [a["ip"]],
                    "conditions": {"ready": ready, "serving": ready, "terminating": false},
                    "nodeName": a["nodeName"],
                    "targetRef": a["targetRef"],
                }));
            }
        }
    }
    // A slice port always has a name ("" when unnamed): kubectl dereferences it.
    let ports: Vec<Value> = subsets
        .first()
        .and_then(|s| s["ports"].as_array())
        .into_iter()
        .flatten()
        .map(|p| {
            let mut p = p.clone();
            if p.get("name").is_none() {
                p["name"] = json!("");
            }
            p
        })
        .collect();
    (endpoints, json!(ports))
}

fn reconcile_slice(reg: &Registry, svc: &Value, subsets: &[Value]) -> Result<(), crate::api::status::ApiError> {
    let kind = by_kind("EndpointSlice");
    let ns = namespace(svc);
    let (endpoints, ports) = slice_endpoints(subsets);
    let existing =
        reg.list(kind, Some(ns)).0.into_iter().find(|s| {
            s.pointer("/metadata/labels/kubernetes.io~1service-name").and_then(Value::as_str) == Some(name(svc))
        });
    match existing {
        None => {
            let slice = json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"generateName": format!("{}-", name(svc)),
                    "labels": {SERVICE_NAME_LABEL: name(svc), "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                    "ownerReferences": [super::objects::owner_ref(svc)]},
                "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
            });
            reg.create(kind, ns, slice, FieldValidation::Ignore).map(drop)
        }
        Some(current) if current["endpoints"] == json!(endpoints) && current["ports"] == ports => Ok(()),
        Some(mut current) => {
            current["endpoints"] = json!(endpoints);
            current["ports"] = ports;
            let slice_name = name(&current).to_owned();
            reg.update(kind, ns, &slice_name, current, false, FieldValidation::Ignore).map(drop)
        }
    }
}

fn has_selector(svc: &Value) -> bool {
    svc.pointer("/spec/selector").and_then(Value::as_object).is_some_and(|m| !m.is_empty())
}

pub fn reconcile(reg: &Registry) {
    let (svc_kind, ep_kind, pod_kind) = (by_kind("Service"), by_kind("Endpoints"), by_kind("Pod"));
    let (services, _) = reg.list(svc_kind, None);
    let (pods, _) = reg.list(pod_kind, None);
    for svc in services.iter().filter(|s| has_selector(s)) {
        let ns = namespace(svc);
        let in_ns: Vec<Value> = pods.iter().filter(|p| namespace(p) == ns).cloned().collect();
        let mut desired = json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": name(svc), "namespace": ns, "labels": svc["metadata"].get("labels").cloned().unwrap_or(json!({}))},
        });
        let subsets = subsets(svc, &in_ns);
        if let Err(e) = reconcile_slice(reg, svc, &subsets) {
            tracing::debug!(service = name(svc), error = %e.message, "endpointslice sync failed");
        }
        if !subsets.is_empty() {
            desired["subsets"] = json!(subsets);
        }
        let result = match reg.get(ep_kind, ns, name(svc)) {
            Err(_) => reg.create(ep_kind, ns, desired, FieldValidation::Ignore).map(drop),
            Ok(current)
                if current.get("subsets") == desired.get("subsets")
                    && current["metadata"]["labels"] == desired["metadata"]["labels"] =>
            {
                Ok(())
            }
            Ok(current) => {
                let mut next = current.clone();
                next["metadata"]["labels"] = desired["metadata"]["labels"].clone();
                match desired.get("subsets") {
                    Some(s) => next["subsets"] = s.clone(),
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("subsets");
                        }
                    }
                }
                reg.update(ep_kind, ns, name(svc), next, false, FieldValidation::Ignore).map(drop)
            }
        };
        if let Err(e) = result {
            tracing::debug!(service = name(svc), error = %e.message, "endpoints sync failed");
        }
    }
    // Endpoints of selector Services that are gone go with them.
    for ep in reg.list(ep_kind, None).0 {
        let owner = services.iter().find(|s| namespace(s) == namespace(&ep) && name(s) == name(&ep));
        if owner.is_none() {
            let _ = reg.delete(ep_kind, namespace(&ep), name(&ep), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "uid": name, "labels": {"app": "hello"}},
            "spec": {"nodeName": "n", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    #[test]
    fn ready_and_unready_pods_with_named_ports() {
        let svc = json!({"spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}]}});
        let pods = [pod("b", "10.100.0.3", true), pod("a", "10.100.0.2", true), pod("c", "10.100.0.4", false)];
        let s = subsets(&svc, &pods);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0]["ports"], json!([{"port": 8080, "protocol": "TCP"}]));
        assert_eq!(s[0]["addresses"][0]["ip"], "10.100.0.2");
        assert_eq!(s[0]["notReadyAddresses"][0]["targetRef"]["name"], "c");
    }

    #[test]
    fn slices_carry_every_address_with_its_readiness() {
        let svc = json!({"spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}});
        let s = subsets(&svc, &[pod("a", "10.100.0.2", true), pod("b", "10.100.0.3", false)]);
        let (endpoints, ports) = slice_endpoints(&s);
        assert_eq!(ports, json!([{"name": "", "port": 8080, "protocol": "TCP"}]));
        let ready: Vec<(Value, Value)> =
            endpoints.iter().map(|e| (e["addresses"][0].clone(), e["conditions"]["ready"].clone())).collect();
        assert_eq!(ready, [(json!("10.100.0.2"), json!(true)), (json!("10.100.0.3"), json!(false))]);
    }

    #[test]
    fn pods_without_an_ip_are_left_out() {
        let svc = json!({"spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}});
        assert!(subsets(&svc, &[pod("a", "", true)]).is_empty());
    }
}
