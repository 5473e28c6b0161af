//! Server-side printing: the `meta.k8s.io/v1` Table that `kubectl get` asks
//! for, with the columns kube-apiserver prints (priority 1 = `-o wide`).

use serde_json::{Value, json};

type Col = (&'static str, &'static str, u8); // (name, type, priority)

fn columns(kind: &str) -> &'static [Col] {
    match kind {
        "Pod" => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        "Deployment" => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "ReplicaSet" => &[
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        "Service" => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        "Endpoints" => &[("Name", "string", 0), ("Endpoints", "string", 0), ("Age", "string", 0)],
        "EndpointSlice" => &[
            ("Name", "string", 0),
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        "Node" => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        "Namespace" => &[("Name", "string", 0), ("Status", "string", 0), ("Age", "string", 0)],
        "ConfigMap" => &[("Name", "string", 0), ("Data", "integer", 0), ("Age", "string", 0)],
        "Secret" => &[("Name", "string", 0), ("Type", "string", 0), ("Data", "integer", 0), ("Age", "string", 0)],
        "ServiceAccount" => &[("Name", "string", 0), ("Secrets", "integer", 0), ("Age", "string", 0)],
        "Event" => &[
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        _ => &[("Name", "string", 0), ("Age", "string", 0)],
    }
}

/// A duration as kubectl prints ages: `45s`, `3m12s`, `5h`, `2d`.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10800 => format!("{}m", s / 60),
        10800..172800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn age(obj: &Value, now: i64) -> String {
    let created = obj.pointer("/metadata/creationTimestamp").and_then(Value::as_str);
    let ts = created.and_then(|c| c.parse::<k8s_openapi::jiff::Timestamp>().ok());
    ts.map_or_else(|| "<unknown>".into(), |t| human_duration(now - t.as_second()))
}

fn s<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr).and_then(Value::as_str).unwrap_or_default()
}

fn n(v: &Value, ptr: &str) -> i64 {
    v.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

fn arr<'a>(v: &'a Value, ptr: &str) -> &'a [Value] {
    v.pointer(ptr).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn joined(items: &[Value], field: &str) -> String {
    items.iter().filter_map(|c| c[field].as_str()).collect::<Vec<_>>().join(",")
}

pub fn selector_string(sel: &Value) -> String {
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    parts.sort();
    or_none(parts.join(","))
}

/// The STATUS column of a pod, computed as kubectl's printer does.
pub fn pod_status(pod: &Value) -> String {
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return "Terminating".into();
    }
    let mut reason = s(pod, "/status/reason").to_owned();
    if reason.is_empty() {
        reason = s(pod, "/status/phase").to_owned();
    }
    let inits = arr(pod, "/status/initContainerStatuses");
    let total_inits = arr(pod, "/spec/initContainers").len();
    for (i, c) in inits.iter().enumerate() {
        let term = c.pointer("/state/terminated");
        if term.is_some_and(|t| t["exitCode"] == 0) {
            continue;
        }
        let waiting = s(c, "/state/waiting/reason");
        return match term {
            Some(t) => format!("Init:{}", t["reason"].as_str().unwrap_or("Error")),
            None if !waiting.is_empty() && waiting != "PodInitializing" => {
                format!("Init:{waiting}")
            }
            None => format!("Init:{i}/{total_inits}"),
        };
    }
    for c in arr(pod, "/status/containerStatuses").iter().rev() {
        let waiting = s(c, "/state/waiting/reason");
        let terminated = s(c, "/state/terminated/reason");
        if !waiting.is_empty() {
            reason = waiting.to_owned();
        } else if !terminated.is_empty() {
            reason = terminated.to_owned();
        }
    }
    reason
}

fn pod_row(p: &Value, now: i64) -> Vec<Value> {
    let statuses = arr(p, "/status/containerStatuses");
    let ready = statuses.iter().filter(|c| c["ready"] == true).count();
    let total = arr(p, "/spec/containers").len();
    let restarts: i64 = statuses.iter().map(|c| c["restartCount"].as_i64().unwrap_or(0)).sum();
    vec![
        json!(format!("{ready}/{total}")),
        json!(pod_status(p)),
        json!(restarts.to_string()),
        json!(age(p, now)),
        json!(or_none(s(p, "/status/podIP").to_owned())),
        json!(or_none(s(p, "/spec/nodeName").to_owned())),
        json!("<none>"),
        json!("<none>"),
    ]
}

fn workload_wide(o: &Value) -> [Value; 3] {
    let cs = arr(o, "/spec/template/spec/containers");
    [json!(joined(cs, "name")), json!(joined(cs, "image")), json!(selector_string(&o["spec"]["selector"]))]
}

fn service_ports(svc: &Value) -> String {
    let ports: Vec<String> = arr(svc, "/spec/ports")
        .iter()
        .map(|p| {
            let proto = p["protocol"].as_str().unwrap_or("TCP");
            match p["nodePort"].as_i64() {
                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                None => format!("{}/{proto}", p["port"]),
            }
        })
        .collect();
    or_none(ports.join(","))
}

fn endpoints_string(ep: &Value) -> String {
    let mut out = Vec::new();
    for subset in arr(ep, "/subsets") {
        for a in arr(subset, "/addresses") {
            for p in arr(subset, "/ports") {
                out.push(format!("{}:{}", s(a, "/ip"), p["port"]));
            }
        }
    }
    let more = out.len().saturating_sub(3);
    out.truncate(3);
    let mut text = out.join(",");
    if more > 0 {
        text.push_str(&format!(" + {more} more..."));
    }
    or_none(text)
}

fn cells(kind: &str, o: &Value, now: i64) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let a = json!(age(o, now));
    let mut row = vec![name];
    match kind {
        "Pod" => row.extend(pod_row(o, now)),
        "Deployment" => {
            row.extend([
                json!(format!("{}/{}", n(o, "/status/readyReplicas"), n(o, "/spec/replicas"))),
                json!(n(o, "/status/updatedReplicas")),
                json!(n(o, "/status/availableReplicas")),
                a,
            ]);
            row.extend(workload_wide(o));
        }
        "ReplicaSet" => {
            row.extend([
                json!(n(o, "/spec/replicas")),
                json!(n(o, "/status/replicas")),
                json!(n(o, "/status/readyReplicas")),
                a,
            ]);
            row.extend(workload_wide(o));
        }
        "Service" => {
            let ext = if s(o, "/spec/type") == "ExternalName" {
                s(o, "/spec/externalName").to_owned()
            } else {
                "<none>".into()
            };
            let ip = if s(o, "/spec/type") == "ExternalName" {
                "<none>".to_owned()
            } else {
                s(o, "/spec/clusterIP").to_owned()
            };
            let sel = o
                .pointer("/spec/selector")
                .map(|m| selector_string(&json!({"matchLabels": m})))
                .unwrap_or_else(|| "<none>".into());
            row.extend([json!(s(o, "/spec/type")), json!(ip), json!(ext), json!(service_ports(o)), a, json!(sel)]);
        }
        "Endpoints" => row.extend([json!(endpoints_string(o)), a]),
        "EndpointSlice" => {
            let ports: Vec<String> =
                arr(o, "/ports").iter().filter_map(|p| p["port"].as_i64()).map(|p| p.to_string()).collect();
            let addrs: Vec<&str> =
                arr(o, "/endpoints").iter().filter_map(|e| e.pointer("/addresses/0").and_then(Value::as_str)).collect();
            row.extend([
                json!(s(o, "/addressType")),
                json!(or_none(ports.join(","))),
                json!(or_none(addrs.join(","))),
                a,
            ]);
        }
        "Node" => {
            let ready = arr(o, "/status/conditions").iter().any(|c| c["type"] == "Ready" && c["status"] == "True");
            let addr = |t: &str| {
                or_none(
                    arr(o, "/status/addresses")
                        .iter()
                        .filter(|x| x["type"] == t)
                        .map(|x| s(x, "/address"))
                        .collect::<Vec<_>>()
                        .join(","),
                )
            };
            row.extend([
                json!(if ready { "Ready" } else { "NotReady" }),
                json!("<none>"),
                a,
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(s(o, "/status/nodeInfo/osImage")),
                json!(s(o, "/status/nodeInfo/kernelVersion")),
                json!(s(o, "/status/nodeInfo/containerRuntimeVersion")),
            ]);
        }
        "Namespace" => row.extend([json!(s(o, "/status/phase")), a]),
        "ConfigMap" => {
            let count = o.get("data").and_then(Value::as_object).map_or(0, |m| m.len())
                + o.get("binaryData").and_then(Value::as_object).map_or(0, |m| m.len());
            row.extend([json!(count), a]);
        }
        "Secret" => row.extend([
            json!(s(o, "/type")),
            json!(o.get("data").and_then(Value::as_object).map_or(0, |m| m.len())),
            a,
        ]),
        "ServiceAccount" => row.extend([json!(arr(o, "/secrets").len()), a]),
        "Event" => {
            let object = format!("{}/{}", s(o, "/involvedObject/kind").to_lowercase(), s(o, "/involvedObject/name"));
            return vec![
                json!(age(o, now)),
                json!(s(o, "/type")),
                json!(s(o, "/reason")),
                json!(object),
                json!(s(o, "/message")),
            ];
        }
        _ => row.push(a),
    }
    row
}

fn partial_metadata(o: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
}

/// A Table of `items` (of one kind). `rv` is the list's resourceVersion.
pub fn table(kind: &str, items: &[Value], rv: Option<u64>) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let defs: Vec<Value> = columns(kind)
        .iter()
        .map(|(name, ty, prio)| json!({"name": name, "type": ty, "format": if *name == "Name" { "name" } else { "" }, "description": "", "priority": prio}))
        .collect();
    let rows: Vec<Value> =
        items.iter().map(|o| json!({"cells": cells(kind, o, now), "object": partial_metadata(o)})).collect();
    let mut t = json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": defs, "rows": rows});
    if let Some(rv) = rv {
        t["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    t
}

/// Whether an Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|a| a.contains("as=Table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_print_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(3600), "60m");
        assert_eq!(human_duration(7 * 3600), "7h");
        assert_eq!(human_duration(3 * 86400), "3d");
    }

    #[test]
    fn pod_status_column() {
        let waiting = json!({"status": {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff"}}}]}});
        assert_eq!(pod_status(&waiting), "ImagePullBackOff");
        let init = json!({"spec": {"initContainers": [{}]}, "status": {"phase": "Pending", "initContainerStatuses": [{"state": {"running": {}}}]}});
        assert_eq!(pod_status(&init), "Init:0/1");
        assert_eq!(pod_status(&json!({"status": {"phase": "Running"}})), "Running");
    }

    #[test]
    fn deployment_rows_have_wide_columns() {
        let d = json!({"metadata": {"name": "hello"}, "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "hello"}}, "template": {"spec": {"containers": [{"name": "echo", "image": "e:1"}]}}}, "status": {"readyReplicas": 1}});
        let t = table("Deployment", &[d], Some(7));
        assert_eq!(t["rows"][0]["cells"], json!(["hello", "1/2", 0, 0, "<unknown>", "echo", "e:1", "app=hello"]));
        assert_eq!(t["columnDefinitions"].as_array().unwrap().len(), 8);
    }
}
