//! The Deployment controller: ReplicaSets named by pod-template-hash,
//! RollingUpdate (maxSurge/maxUnavailable) and Recreate, revision history,
//! and the status and conditions `kubectl rollout status` reads.
//!
//! [`plan`] is pure: from a Deployment and its ReplicaSets it computes the
//! writes of one sync step, as kube-controller-manager's sync does one
//! scale-up or scale-down per pass; [`reconcile`] applies them.

use serde_json::{Value, json};

use super::objects::{controlled_by, int, name, now_rfc3339, owner_ref, seconds_since, set_condition, uid};
use crate::api::admission::FieldValidation;
use crate::api::registry::Registry;
use crate::api::resources::by_kind;

pub const HASH_LABEL: &str = "pod-template-hash";
const REVISION: &str = "deployment.kubernetes.io/revision";

#[derive(Debug, PartialEq)]
pub enum Action {
    Create(Value),
    Update(Value),
    Delete(String),
    /// The Deployment's new status (only when it changed).
    Status(Value),
    /// The Deployment's revision annotation.
    Revision(String),
}

fn fnv32a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The pod-template-hash of a template, encoded as Kubernetes' SafeEncodeString.
pub fn template_hash(template: &Value, collisions: i64) -> String {
    const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut data = serde_json::to_vec(template).unwrap_or_default();
    if collisions > 0 {
        data.extend_from_slice(collisions.to_string().as_bytes());
    }
    fnv32a(&data).to_string().bytes().map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char).collect()
}

fn without_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(labels) = t.pointer_mut("/metadata/labels").and_then(Value::as_object_mut) {
        labels.remove(HASH_LABEL);
    }
    t
}

/// A percentage or count of `total` (`"25%"` or `1`); `up` rounds up.
pub fn scaled_value(v: &Value, total: i64, up: bool) -> i64 {
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            if up { (pct * total + 99) / 100 } else { pct * total / 100 }
        }
        _ => 0,
    }
}

/// (maxSurge, maxUnavailable) resolved against the desired replicas.
fn surge_and_unavailable(d: &Value, replicas: i64) -> (i64, i64) {
    if d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate") {
        return (0, replicas);
    }
    let ru = d.pointer("/spec/strategy/rollingUpdate").cloned().unwrap_or(json!({}));
    let surge = scaled_value(ru.get("maxSurge").unwrap_or(&json!("25%")), replicas, true);
    let unavailable = scaled_value(ru.get("maxUnavailable").unwrap_or(&json!("25%")), replicas, false);
    if surge == 0 && unavailable == 0 { (0, 1.min(replicas)) } else { (surge, unavailable.min(replicas)) }
}

fn revision_of(rs: &Value) -> i64 {
    rs.pointer(&format!("/metadata/annotations/{}", REVISION.replace('/', "~1")))
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn set_annotation(o: &mut Value, key: &str, value: String) {
    if !o["metadata"].get("annotations").is_some_and(Value::is_object) {
        o["metadata"]["annotations"] = json!({});
    }
    o["metadata"]["annotations"][key] = json!(value);
}

fn new_replica_set(d: &Value, hash: &str, replicas: i64, revision: i64) -> Value {
    let mut template = d["spec"]["template"].clone();
    template["metadata"]["labels"][HASH_LABEL] = json!(hash);
    let mut selector = d["spec"]["selector"].clone();
    selector["matchLabels"][HASH_LABEL] = json!(hash);
    let mut rs = json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": format!("{}-{hash}", name(d)),
            "namespace": d["metadata"]["namespace"],
            "labels": template["metadata"]["labels"],
            "ownerReferences": [owner_ref(d)],
        },
        "spec": {"replicas": replicas, "selector": selector, "template": template},
    });
    if let Some(m) = d.pointer("/spec/minReadySeconds") {
        rs["spec"]["minReadySeconds"] = m.clone();
    }
    annotate_replicas(&mut rs, d, revision);
    rs
}

fn annotate_replicas(rs: &mut Value, d: &Value, revision: i64) {
    let replicas = int(d, "/spec/replicas");
    let (surge, _) = surge_and_unavailable(d, replicas);
    set_annotation(rs, REVISION, revision.to_string());
    set_annotation(rs, "deployment.kubernetes.io/desired-replicas", replicas.to_string());
    set_annotation(rs, "deployment.kubernetes.io/max-replicas", (replicas + surge).to_string());
}

fn with_replicas(rs: &Value, replicas: i64) -> Value {
    let mut rs = rs.clone();
    rs["spec"]["replicas"] = json!(replicas);
    rs
}

/// The new ReplicaSet's replicas under RollingUpdate (NewRSNewReplicas).
fn rolling_new_replicas(all: &[&Value], new: &Value, replicas: i64, surge: i64) -> i64 {
    let current: i64 = all.iter().map(|rs| int(rs, "/spec/replicas")).sum();
    let have = int(new, "/spec/replicas");
    let max_total = replicas + surge;
    if current >= max_total {
        return have;
    }
    have + (max_total - current).min(replicas - have).max(0)
}

/// Old ReplicaSets scaled down as far as availability allows
/// (reconcileOldReplicaSets): unhealthy replicas first, then available ones.
fn rolling_old_replicas(
    olds: &[&Value],
    all: &[&Value],
    new: &Value,
    replicas: i64,
    unavailable: i64,
) -> Vec<(usize, i64)> {
    let old_total: i64 = olds.iter().map(|rs| int(rs, "/spec/replicas")).sum();
    if old_total == 0 {
        return Vec::new();
    }
    let all_total: i64 = all.iter().map(|rs| int(rs, "/spec/replicas")).sum();
    let min_available = replicas - unavailable;
    let new_unavailable = int(new, "/spec/replicas") - int(new, "/status/availableReplicas");
    let mut budget = all_total - min_available - new_unavailable;
    let mut target: Vec<i64> = olds.iter().map(|rs| int(rs, "/spec/replicas")).collect();
    for (i, rs) in olds.iter().enumerate() {
        let unhealthy = (target[i] - int(rs, "/status/availableReplicas")).max(0);
        let cut = unhealthy.min(budget.max(0));
        target[i] -= cut;
        budget -= cut;
    }
    let available: i64 = all.iter().map(|rs| int(rs, "/status/availableReplicas")).sum();
    let mut scale_down = available - min_available;
    for t in target.iter_mut() {
        if scale_down <= 0 {
            break;
        }
        let cut = (*t).min(scale_down);
        *t -= cut;
        scale_down -= cut;
    }
    target.into_iter().enumerate().filter(|(i, t)| *t != int(olds[*i], "/spec/replicas")).collect()
}

/// One sync step of a Deployment, given the ReplicaSets it controls.
pub fn plan(d: &Value, owned: &[Value], now: &str) -> Vec<Action> {
    let mut actions = Vec::new();
    let replicas = int(d, "/spec/replicas");
    let (surge, unavailable) = surge_and_unavailable(d, replicas);
    let template = &d["spec"]["template"];
    let mut olds: Vec<&Value> = owned.iter().filter(|rs| without_hash(&rs["spec"]["template"]) != *template).collect();
    olds.sort_by_key(|rs| revision_of(rs));
    let max_old_revision = olds.iter().map(|rs| revision_of(rs)).max().unwrap_or(0);
    let existing = owned.iter().find(|rs| without_hash(&rs["spec"]["template"]) == *template);
    let recreate = d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");
    let paused = d.pointer("/spec/paused") == Some(&json!(true));

    let created;
    let new: &Value = match existing {
        Some(rs) => {
            if revision_of(rs) <= max_old_revision {
                let mut bumped = rs.clone();
                annotate_replicas(&mut bumped, d, max_old_revision + 1);
                actions.push(Action::Update(bumped));
            }
            rs
        }
        None if paused => return status_actions(d, owned, None, false, now),
        None => {
            let hash = template_hash(template, int(d, "/status/collisionCount"));
            let old_pods: i64 = olds.iter().map(|rs| int(rs, "/status/replicas")).sum();
            let empty = json!({"spec": {"replicas": 0}});
            let mut all: Vec<&Value> = olds.clone();
            all.push(&empty);
            let start = match recreate {
                true if old_pods > 0 || olds.iter().any(|rs| int(rs, "/spec/replicas") > 0) => 0,
                true => replicas,
                false => rolling_new_replicas(&all, &empty, replicas, surge),
            };
            created = new_replica_set(d, &hash, start, max_old_revision + 1);
            actions.push(Action::Create(created.clone()));
            &created
        }
    };
    let revision = revision_of(new).max(max_old_revision + 1).to_string();
    let current_revision =
        d.pointer(&format!("/metadata/annotations/{}", REVISION.replace('/', "~1"))).and_then(Value::as_str);
    if current_revision != Some(revision.as_str()) {
        actions.push(Action::Revision(revision));
    }
    let just_created = existing.is_none();
    if !paused && !just_created {
        let mut all: Vec<&Value> = olds.clone();
        all.push(new);
        let have = int(new, "/spec/replicas");
        if recreate {
            let scaled: Vec<&&Value> = olds.iter().filter(|rs| int(rs, "/spec/replicas") > 0).collect();
            if !scaled.is_empty() {
                actions.extend(scaled.into_iter().map(|rs| Action::Update(with_replicas(rs, 0))));
            } else if olds.iter().all(|rs| int(rs, "/status/replicas") == 0) && have != replicas {
                actions.push(Action::Update(with_replicas(new, replicas)));
            }
        } else if have > replicas {
            actions.push(Action::Update(with_replicas(new, replicas)));
        } else {
            let want = rolling_new_replicas(&all, new, replicas, surge);
            if want != have {
                actions.push(Action::Update(with_replicas(new, want)));
            } else {
                for (i, target) in rolling_old_replicas(&olds, &all, new, replicas, unavailable) {
                    actions.push(Action::Update(with_replicas(olds[i], target)));
                }
            }
        }
        actions.extend(history_cleanup(d, &olds));
    }
    actions.extend(status_actions(d, owned, Some(new), just_created, now));
    actions
}

/// Old, empty ReplicaSets beyond `revisionHistoryLimit` are deleted, oldest first.
fn history_cleanup(d: &Value, olds: &[&Value]) -> Vec<Action> {
    let limit = d.pointer("/spec/revisionHistoryLimit").and_then(Value::as_i64).unwrap_or(10);
    let empty: Vec<&&Value> =
        olds.iter().filter(|rs| int(rs, "/spec/replicas") == 0 && int(rs, "/status/replicas") == 0).collect();
    let excess = (empty.len() as i64 - limit).max(0) as usize;
    empty.into_iter().take(excess).map(|rs| Action::Delete(name(rs).to_owned())).collect()
}

fn status_actions(d: &Value, owned: &[Value], new: Option<&Value>, just_created: bool, now: &str) -> Vec<Action> {
    let replicas = int(d, "/spec/replicas");
    let (_, unavailable) = surge_and_unavailable(d, replicas);
    let sum = |ptr: &str| owned.iter().map(|rs| int(rs, ptr)).sum::<i64>();
    let total = sum("/status/replicas");
    let available = sum("/status/availableReplicas");
    let updated = new.map_or(0, |n| int(n, "/status/replicas"));
    let old = d.get("status").cloned().unwrap_or(json!({}));
    let mut status = json!({
        "observedGeneration": d["metadata"]["generation"],
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": sum("/status/readyReplicas"),
        "availableReplicas": available,
        "unavailableReplicas": (replicas - available).max(0),
    });
    if let Some(c) = old.get("collisionCount") {
        status["collisionCount"] = c.clone();
    }
    let mut conds: Vec<Value> = old.get("conditions").and_then(Value::as_array).cloned().unwrap_or_default();
    if available >= replicas - unavailable {
        set_condition(
            &mut conds,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
            now,
        );
    } else {
        set_condition(
            &mut conds,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
            now,
        );
    }
    let rs_name = new.map_or("", |n| name(n));
    let complete = updated == replicas
        && available == replicas
        && total == replicas
        && new.is_some_and(|n| int(n, "/status/availableReplicas") == replicas);
    let progressed = ["replicas", "updatedReplicas", "readyReplicas", "availableReplicas"]
        .iter()
        .any(|k| old.get(*k).and_then(Value::as_i64).unwrap_or(0) != status[*k].as_i64().unwrap_or(0));
    let deadline = d.pointer("/spec/progressDeadlineSeconds").and_then(Value::as_i64).unwrap_or(600);
    let last_progress =
        super::objects::condition(d, "Progressing").and_then(|c| c["lastUpdateTime"].as_str()).map_or(0, seconds_since);
    if complete {
        set_condition(
            &mut conds,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
            now,
        );
    } else if just_created {
        set_condition(
            &mut conds,
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            &format!("Created new replica set \"{rs_name}\""),
            now,
        );
    } else if progressed || d.pointer("/spec/paused") == Some(&json!(true)) {
        set_condition(
            &mut conds,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("ReplicaSet \"{rs_name}\" is progressing."),
            now,
        );
        if let Some(c) = conds.iter_mut().find(|c| c["type"] == "Progressing") {
            c["lastUpdateTime"] = json!(now);
        }
    } else if last_progress > deadline {
        set_condition(
            &mut conds,
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            &format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            now,
        );
    } else if super::objects::condition(d, "Progressing").is_none() {
        set_condition(
            &mut conds,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("ReplicaSet \"{rs_name}\" is progressing."),
            now,
        );
    }
    // A ReplicaSet that cannot create its pods (Pod Security refuses them)
    // says so on the Deployment too, as kube-controller-manager copies it.
    let failure = new.into_iter().chain(owned).find_map(|rs| super::objects::condition(rs, "ReplicaFailure"));
    match failure {
        Some(f) => {
            let text = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
            set_condition(&mut conds, "ReplicaFailure", &text("status"), &text("reason"), &text("message"), now);
        }
        None => conds.retain(|c| c["type"] != "ReplicaFailure"),
    }
    status["conditions"] = json!(conds);
    if status == old { Vec::new() } else { vec![Action::Status(status)] }
}

/// Applies [`plan`] to every Deployment.
pub fn reconcile(reg: &Registry) {
    let (deployments, rs_kind) = (by_kind("Deployment"), by_kind("ReplicaSet"));
    let (all_rs, _) = reg.list(rs_kind, None);
    let now = now_rfc3339();
    for d in reg.list(deployments, None).0 {
        let ns = super::objects::namespace(&d).to_owned();
        let owned: Vec<Value> = all_rs.iter().filter(|rs| controlled_by(rs, uid(&d))).cloned().collect();
        for action in plan(&d, &owned, &now) {
            let result = match action {
                Action::Create(rs) => reg.create(rs_kind, &ns, rs, FieldValidation::Ignore).map(drop),
                Action::Update(rs) => {
                    let rs_name = name(&rs).to_owned();
                    reg.update(rs_kind, &ns, &rs_name, rs, false, FieldValidation::Ignore).map(drop)
                }
                Action::Delete(n) => reg.delete(rs_kind, &ns, &n, false).map(drop),
                Action::Status(status) => {
                    let mut fresh = d.clone();
                    fresh["status"] = status;
                    reg.update(deployments, &ns, name(&d), fresh, true, FieldValidation::Ignore).map(drop)
                }
                Action::Revision(rev) => {
                    let mut fresh = reg.get(deployments, &ns, name(&d)).unwrap_or_else(|_| d.clone());
                    set_annotation(&mut fresh, REVISION, rev);
                    reg.update(deployments, &ns, name(&d), fresh, false, FieldValidation::Ignore).map(drop)
                }
            };
            // A conflict means someone wrote meanwhile; the next pass sees it.
            if let Err(e) = result {
                tracing::debug!(deployment = name(&d), error = %e.message, "deployment sync step failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(replicas: i64, image: &str, strategy: Value) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "hello", "namespace": "default", "uid": "d-uid", "generation": 1},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "hello"}}, "strategy": strategy,
                "template": {"metadata": {"labels": {"app": "hello"}}, "spec": {"containers": [{"name": "c", "image": image}]}}},
        })
    }

    fn rolling() -> Value {
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}})
    }

    /// A ReplicaSet as the ReplicaSet controller would have it, with `ready` pods.
    fn settle(rs: &Value, ready: i64) -> Value {
        let mut rs = rs.clone();
        rs["metadata"]["uid"] = json!(format!("uid-{}", name(&rs)));
        rs["status"] = json!({"replicas": ready, "readyReplicas": ready, "availableReplicas": ready});
        rs
    }

    fn created(actions: &[Action]) -> Value {
        actions.iter().find_map(|a| if let Action::Create(rs) = a { Some(rs.clone()) } else { None }).expect("a create")
    }

    #[test]
    fn a_new_deployment_creates_a_hashed_replica_set() {
        let d = deployment(3, "e:1", rolling());
        let actions = plan(&d, &[], "t");
        let rs = created(&actions);
        let hash = rs["metadata"]["labels"][HASH_LABEL].as_str().unwrap().to_owned();
        assert_eq!(rs["metadata"]["name"], format!("hello-{hash}"));
        assert_eq!(rs["spec"]["selector"]["matchLabels"][HASH_LABEL], hash);
        assert_eq!(rs["spec"]["replicas"], 3);
        assert_eq!(rs["metadata"]["annotations"][REVISION], "1");
        assert!(actions.contains(&Action::Revision("1".into())));
        assert_eq!(template_hash(&d["spec"]["template"], 0), hash, "the hash is stable");
    }

    #[test]
    fn rolling_update_respects_surge_and_unavailable() {
        let d1 = deployment(4, "e:1", rolling());
        let old = settle(&created(&plan(&d1, &[], "t")), 4);
        let mut d2 = deployment(4, "e:2", rolling());
        d2["metadata"]["annotations"] = json!({REVISION: "1"});
        // Step 1: the new RS gets maxSurge (1) replicas.
        let new = created(&plan(&d2, std::slice::from_ref(&old), "t"));
        assert_eq!(new["spec"]["replicas"], 1);
        assert_eq!(new["metadata"]["annotations"][REVISION], "2");
        // Step 2: with the new pod not yet available, old scales down by maxUnavailable (1) only.
        let new = settle(&new, 0);
        let actions = plan(&d2, &[old.clone(), new.clone()], "t");
        let updates: Vec<(String, i64)> = actions
            .iter()
            .filter_map(|a| {
                if let Action::Update(rs) = a { Some((name(rs).to_owned(), int(rs, "/spec/replicas"))) } else { None }
            })
            .collect();
        assert_eq!(updates, [(name(&old).to_owned(), 3)]);
    }

    #[test]
    fn recreate_scales_old_to_zero_before_the_new_one_starts() {
        let strategy = json!({"type": "Recreate"});
        let old = settle(&created(&plan(&deployment(2, "e:1", strategy.clone()), &[], "t")), 2);
        let d2 = deployment(2, "e:2", strategy);
        let actions = plan(&d2, std::slice::from_ref(&old), "t");
        assert_eq!(created(&actions)["spec"]["replicas"], 0);
        let new = settle(&created(&actions), 0);
        let actions = plan(&d2, &[old.clone(), new.clone()], "t");
        assert!(actions.contains(&Action::Update(with_replicas(&old, 0))));
        // Old pods gone: the new RS scales to 2.
        let mut old_gone = with_replicas(&old, 0);
        old_gone["status"] = json!({"replicas": 0});
        let actions = plan(&d2, &[old_gone, new.clone()], "t");
        assert!(actions.contains(&Action::Update(with_replicas(&new, 2))));
    }

    #[test]
    fn status_reports_a_complete_rollout() {
        let d = deployment(2, "e:1", rolling());
        let rs = settle(&created(&plan(&d, &[], "t")), 2);
        let status = plan(&d, &[rs], "t")
            .into_iter()
            .find_map(|a| if let Action::Status(s) = a { Some(s) } else { None })
            .expect("status");
        assert_eq!((status["updatedReplicas"].as_i64(), status["availableReplicas"].as_i64()), (Some(2), Some(2)));
        let progressing = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Progressing").unwrap();
        assert_eq!(progressing["reason"], "NewReplicaSetAvailable");
        assert_eq!(status["observedGeneration"], 1);
    }

    #[test]
    fn a_replica_set_that_cannot_create_pods_says_so_on_the_deployment() {
        let d = deployment(1, "e:1", rolling());
        let mut rs = settle(&created(&plan(&d, &[], "t")), 0);
        let refused = json!({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
            "message": "pods \"x\" is forbidden: ...", "lastTransitionTime": "t0"});
        rs["status"]["conditions"] = json!([refused]);
        let status_of = |d: &Value, rs: &Value| {
            plan(d, std::slice::from_ref(rs), "t1")
                .into_iter()
                .find_map(|a| if let Action::Status(s) = a { Some(s) } else { None })
        };
        let status = status_of(&d, &rs).expect("status");
        let failure = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "ReplicaFailure").unwrap();
        assert_eq!((&failure["reason"], &failure["message"]), (&refused["reason"], &refused["message"]));
        // Once the ReplicaSet creates its pods again, the condition goes.
        let mut d = d;
        d["status"] = status;
        rs["status"] = json!({"replicas": 1, "readyReplicas": 1, "availableReplicas": 1});
        let status = status_of(&d, &rs).expect("status");
        assert!(!status["conditions"].as_array().unwrap().iter().any(|c| c["type"] == "ReplicaFailure"), "{status}");
    }

    #[test]
    fn scaled_values() {
        assert_eq!(scaled_value(&json!("25%"), 3, true), 1);
        assert_eq!(scaled_value(&json!("25%"), 3, false), 0);
        assert_eq!(scaled_value(&json!(2), 3, false), 2);
    }
}
