//! The ReplicaSet controller: keeps `spec.replicas` active pods made from
//! the template, deletes the least useful surplus first, and reports
//! replicas, ready and available counts. A pod the API refuses (Pod
//! Security) leaves a `ReplicaFailure` condition and a `FailedCreate`
//! event, as kube-controller-manager's.

use serde_json::{Value, json};

use super::objects::{
    controlled_by, int, name, namespace, now_rfc3339, owner_ref, pod_active, pod_ready, seconds_since, uid,
};
use crate::api::admission::FieldValidation;
use crate::api::registry::Registry;
use crate::api::resources::by_kind;

/// What one sync of a ReplicaSet does.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub create: usize,
    pub delete: Vec<String>,
    /// The status the counts call for (conditions kept as they were).
    pub status: Value,
}

fn available(pod: &Value, min_ready: i64) -> bool {
    if !pod_ready(pod) {
        return false;
    }
    let since = super::objects::condition(pod, "Ready")
        .and_then(|c| c["lastTransitionTime"].as_str())
        .map_or(i64::MAX, seconds_since);
    min_ready == 0 || since >= min_ready
}

/// Which pods go first when scaling down: unscheduled, pending, not ready,
/// then the newest.
fn deletion_rank(pod: &Value) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let phase = pod.pointer("/status/phase").and_then(Value::as_str).unwrap_or_default();
    let created = pod.pointer("/metadata/creationTimestamp").and_then(Value::as_str).unwrap_or_default().to_owned();
    (
        u8::from(pod.pointer("/spec/nodeName").is_some()),
        u8::from(phase != "Pending"),
        u8::from(pod_ready(pod)),
        std::cmp::Reverse(created),
    )
}

pub fn plan(rs: &Value, pods: &[Value]) -> Plan {
    let want = int(rs, "/spec/replicas");
    let mut active: Vec<&Value> = pods.iter().filter(|p| pod_active(p)).collect();
    let have = active.len() as i64;
    let (mut create, mut delete) = (0, Vec::new());
    if have < want {
        create = (want - have) as usize;
    } else if have > want {
        active.sort_by_key(|p| deletion_rank(p));
        delete = active.iter().take((have - want) as usize).map(|p| name(p).to_owned()).collect();
    }
    let min_ready = int(rs, "/spec/minReadySeconds");
    let labels_match = |p: &&&Value| {
        let labels = rs.pointer("/spec/template/metadata/labels").and_then(Value::as_object);
        labels.into_iter().flatten().all(|(k, v)| p.pointer(&format!("/metadata/labels/{k}")) == Some(v))
    };
    let mut status = json!({
        "replicas": have,
        "fullyLabeledReplicas": active.iter().filter(labels_match).count(),
        "readyReplicas": active.iter().filter(|p| pod_ready(p)).count(),
        "availableReplicas": active.iter().filter(|p| available(p, min_ready)).count(),
        "observedGeneration": rs["metadata"]["generation"],
    });
    if let Some(conds) = rs.pointer("/status/conditions").filter(|c| c.as_array().is_some_and(|a| !a.is_empty())) {
        status["conditions"] = conds.clone();
    }
    Plan { create, delete, status }
}

/// The `ReplicaFailure` condition after a sync whose pod creation failed
/// with `failed` (None: no creation failed), as kube-controller-manager
/// sets it: the first failure's message stays until a sync fails no more.
pub fn record_failure(status: &mut Value, failed: Option<&str>, now: &str) {
    let mut conds: Vec<Value> = status["conditions"].as_array().cloned().unwrap_or_default();
    let present = conds.iter().any(|c| c["type"] == "ReplicaFailure");
    match failed {
        Some(message) if !present => conds.push(json!({
            "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
            "message": message, "lastTransitionTime": now,
        })),
        Some(_) => {}
        None => conds.retain(|c| c["type"] != "ReplicaFailure"),
    }
    match status.as_object_mut() {
        Some(s) if conds.is_empty() => {
            s.remove("conditions");
        }
        _ => status["conditions"] = json!(conds),
    }
}

fn pod_from_template(rs: &Value) -> Value {
    let template = &rs["spec"]["template"];
    let mut meta = template.get("metadata").cloned().unwrap_or(json!({}));
    meta["generateName"] = json!(format!("{}-", name(rs)));
    meta["ownerReferences"] = json!([owner_ref(rs)]);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
}

pub fn reconcile(reg: &Registry) {
    let (rs_kind, pod_kind) = (by_kind("ReplicaSet"), by_kind("Pod"));
    let (pods, _) = reg.list(pod_kind, None);
    for rs in reg.list(rs_kind, None).0 {
        let ns = namespace(&rs).to_owned();
        let owned: Vec<Value> = pods.iter().filter(|p| controlled_by(p, uid(&rs))).cloned().collect();
        let mut plan = plan(&rs, &owned);
        let mut failed = None;
        for _ in 0..plan.create {
            // The first refusal ends the sync, as the real controller's
            // batches stop at an error; the next pass tries again.
            if let Err(e) = reg.create(pod_kind, &ns, pod_from_template(&rs), FieldValidation::Ignore) {
                tracing::debug!(replicaset = name(&rs), error = %e.message, "creating a pod failed");
                failed_create_event(reg, &rs, &e.message);
                failed = Some(e.message);
                break;
            }
        }
        for pod in &plan.delete {
            let _ = reg.delete(pod_kind, &ns, pod, false);
        }
        record_failure(&mut plan.status, failed.as_deref(), &now_rfc3339());
        if rs.get("status") != Some(&plan.status) {
            let mut fresh = rs.clone();
            fresh["status"] = plan.status;
            // A conflict means the ReplicaSet changed; the next pass recounts.
            let _ = reg.update(rs_kind, &ns, name(&rs), fresh, true, FieldValidation::Ignore);
        }
    }
}

/// The `FailedCreate` warning event `kubectl describe` shows, one per
/// ReplicaSet, counted up on each failure (the real event recorder folds
/// repeats the same way).
fn failed_create_event(reg: &Registry, rs: &Value, message: &str) {
    let kind = by_kind("Event");
    let ns = namespace(rs);
    let event_name = format!("{}.failedcreate", name(rs));
    let now = now_rfc3339();
    let message = format!("Error creating: {message}");
    let written = match reg.get(kind, ns, &event_name) {
        Ok(mut ev) => {
            ev["count"] = json!(int(&ev, "/count") + 1);
            ev["lastTimestamp"] = json!(now);
            ev["message"] = json!(message);
            reg.update(kind, ns, &event_name, ev, false, FieldValidation::Ignore)
        }
        Err(_) => {
            let ev = json!({
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"name": event_name, "namespace": ns},
                "involvedObject": {"apiVersion": "apps/v1", "kind": "ReplicaSet", "namespace": ns,
                    "name": name(rs), "uid": uid(rs), "resourceVersion": rs["metadata"]["resourceVersion"]},
                "reason": "FailedCreate", "message": message, "type": "Warning", "count": 1,
                "source": {"component": "replicaset-controller"}, "reportingComponent": "replicaset-controller",
                "firstTimestamp": now, "lastTimestamp": now,
            });
            reg.create(kind, ns, ev, FieldValidation::Ignore)
        }
    };
    if let Err(e) = written {
        tracing::debug!(error = %e.message, "recording a FailedCreate event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(replicas: i64) -> Value {
        json!({"metadata": {"name": "r", "uid": "u", "generation": 1},
            "spec": {"replicas": replicas, "template": {"metadata": {"labels": {"app": "a"}}, "spec": {}}}})
    }

    fn pod(name: &str, phase: &str, ready: bool, created: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "a"}, "creationTimestamp": created},
            "spec": {"nodeName": "n"},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }, "lastTransitionTime": "2020-01-01T00:00:00Z"}]}})
    }

    #[test]
    fn creates_missing_pods() {
        let p = plan(&rs(3), &[pod("a", "Running", true, "t1")]);
        assert_eq!(p.create, 2);
        let s = p.status;
        assert_eq!(
            (s["replicas"].as_i64(), s["readyReplicas"].as_i64(), s["availableReplicas"].as_i64()),
            (Some(1), Some(1), Some(1))
        );
    }

    #[test]
    fn deletes_pending_and_unready_pods_first() {
        let pods = [
            pod("ready-old", "Running", true, "t1"),
            pod("pending", "Pending", false, "t2"),
            pod("ready-new", "Running", true, "t3"),
            pod("done", "Succeeded", false, "t0"),
        ];
        let p = plan(&rs(1), &pods);
        assert_eq!(p.delete, ["pending", "ready-new"]);
        assert_eq!(p.create, 0);
    }

    #[test]
    fn a_refused_pod_leaves_the_first_failure_until_creation_succeeds() {
        let mut status = plan(&rs(1), &[]).status;
        record_failure(&mut status, Some("pods \"r-a\" is forbidden: x"), "t1");
        let failure = json!([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
            "message": "pods \"r-a\" is forbidden: x", "lastTransitionTime": "t1"}]);
        assert_eq!(status["conditions"], failure);
        // The next failure (another generated name) changes nothing, so the
        // status is not rewritten on every pass.
        let mut again = rs(1);
        again["status"] = status.clone();
        let mut next = plan(&again, &[]).status;
        record_failure(&mut next, Some("pods \"r-b\" is forbidden: x"), "t2");
        assert_eq!(next, status);
        record_failure(&mut next, None, "t3");
        assert!(next.get("conditions").is_none(), "{next}");
    }

    /// Through the registry, as in the server: Pod Security refuses every
    /// pod, so none exists, the ReplicaSet says why and an event counts
    /// the attempts.
    #[test]
    fn pods_refused_by_pod_security_leave_a_condition_and_an_event() {
        let reg = Registry::new(std::sync::Arc::new(crate::store::Store::new()));
        let ns = json!({"metadata": {"name": "shop", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
        reg.create(by_kind("Namespace"), "", ns, FieldValidation::Strict).expect("namespace");
        let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "r"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "a"}},
                "template": {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        reg.create(by_kind("ReplicaSet"), "shop", rs, FieldValidation::Strict)
            .expect("stored: templates are not enforced");
        reconcile(&reg);
        reconcile(&reg);
        assert!(reg.list(by_kind("Pod"), Some("shop")).0.is_empty(), "no pod was created");
        let rs = reg.get(by_kind("ReplicaSet"), "shop", "r").expect("rs");
        let cond = &rs["status"]["conditions"][0];
        assert_eq!((&cond["type"], &cond["reason"]), (&json!("ReplicaFailure"), &json!("FailedCreate")));
        let message = cond["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("pods \"r-")
                && message.contains(" is forbidden: violates PodSecurity \"restricted:latest\": "),
            "{message}"
        );
        let event = reg.get(by_kind("Event"), "shop", "r.failedcreate").expect("event");
        assert_eq!((event["count"].as_i64(), &event["type"]), (Some(2), &json!("Warning")), "one refusal per sync");
        assert!(event["message"].as_str().unwrap_or_default().starts_with("Error creating: pods \"r-"), "{event}");
    }
}
