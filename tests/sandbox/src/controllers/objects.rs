//! Small readers of object JSON that every controller needs: ownership,
//! readiness, conditions and timestamps.

use serde_json::{Value, json};

pub fn name(o: &Value) -> &str {
    o.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default()
}

pub fn namespace(o: &Value) -> &str {
    o.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default()
}

pub fn uid(o: &Value) -> &str {
    o.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default()
}

pub fn int(o: &Value, ptr: &str) -> i64 {
    o.pointer(ptr).and_then(Value::as_i64).unwrap_or(0)
}

/// Whether `o` has a controller ownerReference to the object with `owner_uid`.
pub fn controlled_by(o: &Value, owner_uid: &str) -> bool {
    o.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|r| r["uid"] == owner_uid && r["controller"] == true)
}

/// The ownerReference a controller puts on what it creates.
pub fn owner_ref(owner: &Value) -> Value {
    json!({
        "apiVersion": owner["apiVersion"], "kind": owner["kind"],
        "name": name(owner), "uid": uid(owner),
        "controller": true, "blockOwnerDeletion": true,
    })
}

/// Not finished and not being deleted.
pub fn pod_active(p: &Value) -> bool {
    let phase = p.pointer("/status/phase").and_then(Value::as_str).unwrap_or_default();
    phase != "Succeeded" && phase != "Failed" && p.pointer("/metadata/deletionTimestamp").is_none()
}

pub fn condition<'a>(o: &'a Value, kind: &str) -> Option<&'a Value> {
    o.pointer("/status/conditions").and_then(Value::as_array)?.iter().find(|c| c["type"] == kind)
}

pub fn pod_ready(p: &Value) -> bool {
    condition(p, "Ready").is_some_and(|c| c["status"] == "True")
}

pub fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub fn seconds_since(ts: &str) -> i64 {
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    ts.parse::<k8s_openapi::jiff::Timestamp>().map_or(0, |t| now - t.as_second())
}

/// Sets a condition in `conds`, keeping its timestamps when nothing changed
/// and its lastTransitionTime when only the reason or message did.
pub fn set_condition(conds: &mut Vec<Value>, kind: &str, status: &str, reason: &str, message: &str, now: &str) {
    let fresh = json!({"type": kind, "status": status, "reason": reason, "message": message, "lastUpdateTime": now, "lastTransitionTime": now});
    match conds.iter_mut().find(|c| c["type"] == kind) {
        None => conds.push(fresh),
        Some(c) if c["status"] == status && c["reason"] == reason && c["message"] == message => {}
        Some(c) => {
            let transition = if c["status"] == status { c["lastTransitionTime"].clone() } else { json!(now) };
            *c = fresh;
            c["lastTransitionTime"] = transition;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_keep_times_when_unchanged() {
        let mut conds = Vec::new();
        set_condition(&mut conds, "Available", "True", "R", "m", "t1");
        set_condition(&mut conds, "Available", "True", "R", "m", "t2");
        assert_eq!(conds[0]["lastUpdateTime"], "t1");
        set_condition(&mut conds, "Available", "True", "R2", "m", "t3");
        assert_eq!(
            (conds[0]["lastUpdateTime"].as_str(), conds[0]["lastTransitionTime"].as_str()),
            (Some("t3"), Some("t1"))
        );
        set_condition(&mut conds, "Available", "False", "R2", "m", "t4");
        assert_eq!(conds[0]["lastTransitionTime"], "t4");
    }
}
