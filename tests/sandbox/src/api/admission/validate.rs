//! Field validation that answers 422 Invalid with causes, worded as
//! kube-apiserver words them, for the mistakes tests and users make.

use serde_json::Value;

use crate::api::selectors::LabelSelector;
use crate::api::status::Cause;

const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// `metadata.name` of a kind that wants a DNS label (services, namespaces)
/// or a subdomain (the rest).
pub fn name(name: &str, label: bool) -> Vec<Cause> {
    let ok = if label { is_dns_label(name) } else { is_dns_subdomain(name) };
    if ok {
        return Vec::new();
    }
    vec![Cause::invalid("metadata.name", &Value::from(name), if label { LABEL_MSG } else { SUBDOMAIN_MSG })]
}

pub fn pod_spec(spec: &Value, at: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let containers = spec.get("containers").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if containers.is_empty() {
        causes.push(Cause::required(format!("{at}.containers")));
    }
    let mut seen = Vec::new();
    for field in ["initContainers", "containers"] {
        for (i, c) in spec.get(field).and_then(Value::as_array).into_iter().flatten().enumerate() {
            let here = format!("{at}.{field}[{i}]");
            match c.get("name").and_then(Value::as_str) {
                None | Some("") => causes.push(Cause::required(format!("{here}.name"))),
                Some(n) if !is_dns_label(n) => {
                    causes.push(Cause::invalid(format!("{here}.name"), &Value::from(n), LABEL_MSG))
                }
                Some(n) if seen.contains(&n) => causes.push(Cause::duplicate(format!("{here}.name"), &Value::from(n))),
                Some(n) => seen.push(n),
            }
            if c.get("image").and_then(Value::as_str).is_none_or(str::is_empty) {
                causes.push(Cause::required(format!("{here}.image")));
            }
        }
    }
    causes
}

/// A Deployment's or ReplicaSet's selector, template labels and pod spec.
pub fn workload(obj: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let spec = &obj["spec"];
    if spec.get("replicas").and_then(Value::as_i64).is_some_and(|r| r < 0) {
        causes.push(Cause::invalid("spec.replicas", &spec["replicas"], "must be greater than or equal to 0"));
    }
    match spec.get("selector") {
        None | Some(Value::Null) => causes.push(Cause::required("spec.selector")),
        Some(sel) => {
            let parsed = LabelSelector::from_object(sel);
            if parsed.is_empty() {
                causes.push(Cause::invalid("spec.selector", sel, "empty selector is invalid for deployment"));
            } else if !parsed.matches_labels(spec.pointer("/template/metadata/labels")) {
                let labels = spec.pointer("/template/metadata/labels").cloned().unwrap_or(Value::Null);
                causes.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    &labels,
                    "`selector` does not match template `labels`",
                ));
            }
        }
    }
    match spec.pointer("/template/spec") {
        Some(t) => causes.extend(pod_spec(t, "spec.template.spec")),
        None => causes.push(Cause::required("spec.template.spec.containers")),
    }
    if spec.pointer("/strategy/type") == Some(&Value::from("Recreate"))
        && spec.pointer("/strategy/rollingUpdate").is_some()
    {
        causes.push(Cause::forbidden(
            "spec.strategy.rollingUpdate",
            "may not be specified when strategy `type` is 'Recreate'",
        ));
    }
    causes
}

/// A Service's ports (its ClusterIP and NodePorts are checked by the allocator).
pub fn service(svc: &Value) -> Vec<Cause> {
    let spec = &svc["spec"];
    let mut causes = Vec::new();
    let headless = spec.get("clusterIP") == Some(&Value::from("None"));
    let ports = spec.get("ports").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if ports.is_empty() && !headless && spec["type"] != "ExternalName" {
        causes.push(Cause::required("spec.ports"));
    }
    if spec["type"] == "ExternalName" && spec.get("externalName").and_then(Value::as_str).is_none_or(str::is_empty) {
        causes.push(Cause::required("spec.externalName"));
    }
    for (i, p) in ports.iter().enumerate() {
        if !p["port"].as_i64().is_some_and(|n| (1..=65535).contains(&n)) {
            causes.push(Cause::invalid(
                format!("spec.ports[{i}].port"),
                &p["port"],
                "must be between 1 and 65535, inclusive",
            ));
        }
        if ports.len() > 1 && p.get("name").and_then(Value::as_str).is_none_or(str::is_empty) {
            causes.push(Cause::required(format!("spec.ports[{i}].name")));
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names() {
        assert!(is_dns_label("hello-1"));
        assert!(!is_dns_label("Hello"));
        assert!(!is_dns_label("-a"));
        assert!(is_dns_subdomain("a.b-c"));
        assert!(!is_dns_subdomain("a..b"));
        assert_eq!(name("Bad_Name", false)[0].field, "metadata.name");
    }

    #[test]
    fn deployments_need_containers_and_a_matching_selector() {
        let d = json!({"spec": {"selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "y"}}, "spec": {"containers": []}}}});
        let fields: Vec<String> = workload(&d).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["spec.template.metadata.labels", "spec.template.spec.containers"]);
    }

    #[test]
    fn services_need_ports() {
        assert_eq!(service(&json!({"spec": {"type": "ClusterIP"}}))[0].field, "spec.ports");
        assert!(service(&json!({"spec": {"type": "ClusterIP", "clusterIP": "None"}})).is_empty());
    }
}
