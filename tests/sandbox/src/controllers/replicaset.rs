//! The ReplicaSet controller: keeps `spec.replicas` active pods made from
//! the template, deletes the least useful surplus first, and reports
//! replicas, ready and available counts.

use serde_json::{Value, json};

use super::objects::{controlled_by, int, name, namespace, owner_ref, pod_active, pod_ready, seconds_since, uid};
use crate::api::admission::FieldValidation;
use crate::api::registry::Registry;
use crate::api::resources::by_kind;

/// What one sync of a ReplicaSet does.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub create: usize,
    pub delete: Vec<String>,
    /// The new status, when it changed.
    pub status: Option<Value>,
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
    let status = json!({
        "replicas": have,
        "fullyLabeledReplicas": active.iter().filter(labels_match).count(),
        "readyReplicas": active.iter().filter(|p| pod_ready(p)).count(),
        "availableReplicas": active.iter().filter(|p| available(p, min_ready)).count(),
        "observedGeneration": rs["metadata"]["generation"],
    });
    let changed = rs.get("status") != Some(&status);
    Plan { create, delete, status: changed.then_some(status) }
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
        let plan = plan(&rs, &owned);
        for _ in 0..plan.create {
            if let Err(e) = reg.create(pod_kind, &ns, pod_from_template(&rs), FieldValidation::Ignore) {
                tracing::warn!(replicaset = name(&rs), error = %e.message, "creating a pod failed");
            }
        }
        for pod in &plan.delete {
            let _ = reg.delete(pod_kind, &ns, pod, false);
        }
        if let Some(status) = plan.status {
            let mut fresh = rs.clone();
            fresh["status"] = status;
            // A conflict means the ReplicaSet changed; the next pass recounts.
            let _ = reg.update(rs_kind, &ns, name(&rs), fresh, true, FieldValidation::Ignore);
        }
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
        let s = p.status.unwrap();
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
}
