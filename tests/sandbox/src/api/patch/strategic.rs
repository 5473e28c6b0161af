//! Strategic merge patch for the kinds the sandbox serves: lists that
//! Kubernetes merges by key are merged element by element, other lists are
//! replaced; the directives kubectl apply sends (`$patch`,
//! `$setElementOrder/<list>`, `$retainKeys`, `$deleteFromPrimitiveList/<list>`)
//! are honoured.

use serde_json::{Map, Value};

/// How a list field merges, by its path of field names from the object root.
#[derive(Debug, PartialEq)]
enum ListStrategy {
    /// Elements are objects identified by this key.
    ByKey(&'static str),
    /// A list of scalars merged as a set (`metadata.finalizers`).
    Set,
    Replace,
}

fn strategy(path: &[&str]) -> ListStrategy {
    use ListStrategy::*;
    const CONTAINERS: &[&str] = &["containers", "initContainers", "ephemeralContainers"];
    let n = path.len();
    let Some(&last) = path.last() else {
        return Replace;
    };
    let parent = if n >= 2 { path[n - 2] } else { "" };
    match (parent, last) {
        ("metadata", "finalizers") => Set,
        ("metadata", "ownerReferences") => ByKey("uid"),
        ("status", "conditions") => ByKey("type"),
        ("spec", c) if CONTAINERS.contains(&c) => ByKey("name"),
        ("spec", "volumes" | "imagePullSecrets") => ByKey("name"),
        ("spec", "hostAliases") => ByKey("ip"),
        // A Service's ports (a pod spec has no `spec.ports`).
        ("spec", "ports") if n == 2 => ByKey("port"),
        (c, "env") if CONTAINERS.contains(&c) => ByKey("name"),
        (c, "ports") if CONTAINERS.contains(&c) => ByKey("containerPort"),
        (c, "volumeMounts") if CONTAINERS.contains(&c) => ByKey("mountPath"),
        (c, "volumeDevices") if CONTAINERS.contains(&c) => ByKey("devicePath"),
        _ => Replace,
    }
}

/// Applies a strategic merge patch to `original`.
pub fn strategic_merge(original: &Value, patch: &Value) -> Value {
    merge_value(Some(original), patch, &mut Vec::new()).unwrap_or(Value::Null)
}

/// `None` means "delete this value" (a `$patch: delete` map).
fn merge_value(original: Option<&Value>, patch: &Value, path: &mut Vec<String>) -> Option<Value> {
    match patch {
        Value::Object(p) => merge_map(original.and_then(Value::as_object), p, path),
        other => Some(other.clone()),
    }
}

fn merge_map(
    original: Option<&Map<String, Value>>,
    patch: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Option<Value> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("delete") => return None,
        Some("replace") => {
            let mut replaced = patch.clone();
            replaced.remove("$patch");
            return Some(Value::Object(replaced));
        }
        _ => {}
    }
    let mut out = original.cloned().unwrap_or_default();
    let mut orders = Vec::new();
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            orders.push((list.to_owned(), value));
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        path.push(key.clone());
        let merged = match value {
            Value::Null => None,
            Value::Array(items) => Some(merge_list(out.get(key), items, path)),
            other => merge_value(out.get(key), other, path),
        };
        path.pop();
        match merged {
            Some(v) => out.insert(key.clone(), v),
            None => out.remove(key),
        };
    }
    for (key, gone) in patch {
        if let (Some(list), Some(gone)) = (key.strip_prefix("$deleteFromPrimitiveList/"), gone.as_array())
            && let Some(Value::Array(items)) = out.get_mut(list)
        {
            items.retain(|i| !gone.contains(i));
        }
    }
    for (list, order) in orders {
        if let (Some(Value::Array(items)), Some(order)) = (out.get_mut(&list), order.as_array()) {
            path.push(list.clone());
            reorder(items, order, &strategy(&as_strs(path)));
            path.pop();
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        out.retain(|k, _| keep.iter().any(|r| r.as_str() == Some(k)));
    }
    Some(Value::Object(out))
}

fn as_strs(path: &[String]) -> Vec<&str> {
    path.iter().map(String::as_str).collect()
}

fn merge_list(original: Option<&Value>, patch: &[Value], path: &mut Vec<String>) -> Value {
    let original = original.and_then(Value::as_array).cloned().unwrap_or_default();
    // `[{"$patch": "replace"}, ...]` replaces the whole list with the rest.
    if patch.iter().any(|p| p.get("$patch").and_then(Value::as_str) == Some("replace")) {
        return Value::Array(patch.iter().filter(|p| p.get("$patch").is_none()).cloned().collect());
    }
    match strategy(&as_strs(path)) {
        ListStrategy::Replace => Value::Array(patch.to_vec()),
        ListStrategy::Set => {
            let mut out = original;
            for p in patch {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
            Value::Array(out)
        }
        ListStrategy::ByKey(key) => {
            let mut out = original;
            for p in patch {
                let id = p.get(key);
                let pos = out.iter().position(|o| id.is_some() && o.get(key) == id);
                let delete = p.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(i), true) => {
                        out.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        if let Some(v) = merge_value(Some(&out[i]), p, path) {
                            out[i] = v;
                        }
                    }
                    (None, false) => {
                        if let Some(v) = merge_value(None, p, path) {
                            out.push(v);
                        }
                    }
                }
            }
            Value::Array(out)
        }
    }
}

/// Puts the elements named in `order` first, in that order; others follow.
fn reorder(items: &mut [Value], order: &[Value], strategy: &ListStrategy) {
    let id = |v: &Value| match strategy {
        ListStrategy::ByKey(k) => v.get(*k).cloned(),
        _ => Some(v.clone()),
    };
    let rank = |v: &Value| {
        let mine = id(v);
        order.iter().position(|o| mine.is_some() && id(o) == mine).unwrap_or(order.len())
    };
    items.sort_by_key(rank);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn deployment() -> Value {
        json!({"spec": {"template": {"spec": {
            "containers": [
                {"name": "app", "image": "a:1", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                 "ports": [{"containerPort": 8080}], "volumeMounts": [{"name": "v", "mountPath": "/v"}]},
                {"name": "side", "image": "s:1"}
            ],
            "volumes": [{"name": "v", "emptyDir": {}}],
            "tolerations": [{"key": "x"}]
        }}}})
    }

    #[test]
    fn containers_and_env_merge_by_name() {
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}
        ]}}}});
        let out = strategic_merge(&deployment(), &patch);
        let c = &out["spec"]["template"]["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 2);
        assert_eq!(c[0]["image"], "a:1");
        assert_eq!(
            c[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
        );
        assert_eq!(c[1]["name"], "side");
    }

    #[test]
    fn delete_and_replace_directives() {
        let patch = json!({"spec": {"template": {"spec": {
            "containers": [{"name": "side", "$patch": "delete"}],
            "volumes": [{"$patch": "replace"}, {"name": "w", "emptyDir": {}}],
            "tolerations": []
        }}}});
        let out = strategic_merge(&deployment(), &patch);
        let s = &out["spec"]["template"]["spec"];
        assert_eq!(s["containers"].as_array().unwrap().len(), 1);
        assert_eq!(s["volumes"], json!([{"name": "w", "emptyDir": {}}]));
        assert_eq!(s["tolerations"], json!([]));
    }

    #[test]
    fn kubectl_apply_patch_with_element_order_and_retain_keys() {
        // What kubectl apply sends after an edit that renames env B->D and
        // switches a volume's source.
        let patch = json!({"spec": {"template": {"spec": {
            "$setElementOrder/containers": [{"name": "side"}, {"name": "app"}],
            "containers": [{"name": "app",
                "$setElementOrder/env": [{"name": "A"}, {"name": "D"}],
                "env": [{"name": "B", "$patch": "delete"}, {"name": "D", "value": "9"}]}],
            "volumes": [{"name": "v", "$retainKeys": ["configMap", "name"], "configMap": {"name": "cm"}}]
        }}}});
        let out = strategic_merge(&deployment(), &patch);
        let s = &out["spec"]["template"]["spec"];
        assert_eq!(s["containers"][0]["name"], "side");
        assert_eq!(s["containers"][1]["env"], json!([{"name": "A", "value": "1"}, {"name": "D", "value": "9"}]));
        assert_eq!(s["volumes"], json!([{"name": "v", "configMap": {"name": "cm"}}]));
    }

    #[test]
    fn null_removes_and_finalizers_merge_as_a_set() {
        let orig = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1", "y": "2"}}});
        let patch = json!({"metadata": {"finalizers": ["b", "a"], "labels": {"x": null},
            "$deleteFromPrimitiveList/finalizers": ["a"]}});
        let out = strategic_merge(&orig, &patch);
        assert_eq!(out["metadata"]["labels"], json!({"y": "2"}));
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
    }

    #[test]
    fn service_ports_merge_by_port() {
        let orig = json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443}]}});
        let out = strategic_merge(&orig, &json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}));
        assert_eq!(out["spec"]["ports"], json!([{"port": 80, "targetPort": 9090}, {"port": 443}]));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf =
            prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::from), "[a-z$/]{0,8}".prop_map(Value::from)];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    "(\\$patch|\\$retainKeys|name|spec|containers|env|\\$setElementOrder/env|[a-z]{1,4})",
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics(orig in arb_json(), patch in arb_json()) {
            let _ = strategic_merge(&orig, &patch);
        }
    }
}
