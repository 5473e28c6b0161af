//! Discovery documents (`/version`, `/api`, `/apis`, resource lists) and the
//! small OpenAPI v3 documents kubectl reads to learn that the server does
//! strict field validation itself (so `kubectl apply` works with its default
//! `--validate=strict`).

use serde_json::{Value, json};

use super::resources::{GROUPS, RESOURCES, Resource};

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-tpd-sandbox",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "none (tpd-sandbox, Rust)",
        "compiler": "rustc",
        "platform": "linux/amd64"
    })
}

pub fn core_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]
    })
}

fn group(name: &str) -> Value {
    let gv = json!({"groupVersion": format!("{name}/v1"), "version": "v1"});
    json!({"name": name, "versions": [gv.clone()], "preferredVersion": gv})
}

pub fn groups() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": GROUPS.iter().map(|g| group(g)).collect::<Vec<_>>()})
}

pub fn one_group(name: &str) -> Value {
    let mut g = group(name);
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    g
}

fn entry(r: &Resource) -> Value {
    let mut e = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": r.verbs(),
    });
    if !r.short_names.is_empty() {
        e["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        e["categories"] = json!(r.categories);
    }
    e
}

fn sub_entry(r: &Resource, sub: &str) -> Value {
    let (kind, group, version, verbs): (&str, &str, &str, &[&str]) = match sub {
        "status" => (r.kind, "", "", &["get", "patch", "update"]),
        "scale" => ("Scale", "autoscaling", "v1", &["get", "patch", "update"]),
        "log" => ("Pod", "", "", &["get"]),
        _ => ("PodExecOptions", "", "", &["create", "get"]),
    };
    let mut e = json!({"name": format!("{}/{sub}", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": kind, "verbs": verbs});
    if !group.is_empty() {
        e["group"] = json!(group);
        e["version"] = json!(version);
    }
    e
}

pub fn resource_list(group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        resources.push(entry(r));
        resources.extend(r.subresources.iter().map(|s| sub_entry(r, s)));
    }
    let gv = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

pub fn openapi_root() -> Value {
    let mut paths = serde_json::Map::new();
    paths.insert("api/v1".into(), json!({"serverRelativeURL": "/openapi/v3/api/v1"}));
    for g in GROUPS {
        paths.insert(format!("apis/{g}/v1"), json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/v1")}));
    }
    json!({"paths": paths})
}

/// A PATCH operation per kind that declares the `fieldValidation` parameter:
/// all kubectl's field-validation check looks for.
pub fn openapi_group_version(group: &str, version: &str) -> Value {
    let mut paths = serde_json::Map::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version && !r.create_only) {
        let prefix = if group.is_empty() { format!("/api/{version}") } else { format!("/apis/{group}/{version}") };
        let path = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{prefix}/{}/{{name}}", r.plural)
        };
        paths.insert(
            path,
            json!({"patch": {
                "operationId": format!("patch{}", r.kind),
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}}],
                "responses": {"200": {"description": "OK"}}
            }}),
        );
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (tpd-sandbox)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_list_has_pods_and_their_subresources() {
        let l = resource_list("", "v1");
        let names: Vec<&str> = l["resources"].as_array().unwrap().iter().filter_map(|r| r["name"].as_str()).collect();
        assert!(names.contains(&"pods") && names.contains(&"pods/log") && names.contains(&"services/status"));
        assert!(!names.contains(&"deployments"));
        let apps = resource_list("apps", "v1");
        assert_eq!(apps["groupVersion"], "apps/v1");
        let scale = apps["resources"].as_array().unwrap().iter().find(|r| r["name"] == "deployments/scale").unwrap();
        assert_eq!(scale["group"], "autoscaling");
    }
}
