//! The defaults kube-apiserver fills in, so objects read back look like a
//! real cluster's (and a Deployment's template hashes the same on every write).

use serde_json::{Value, json};

use crate::layout;

/// Sets `key` to `value` unless it is present.
fn or_insert(obj: &mut Value, key: &str, value: Value) {
    if let Some(map) = obj.as_object_mut() {
        map.entry(key).or_insert(value);
    }
}

fn containers_mut<'a>(spec: &'a mut Value, field: &str) -> impl Iterator<Item = &'a mut Value> {
    spec.get_mut(field).and_then(Value::as_array_mut).into_iter().flatten()
}

fn image_pull_policy(image: &str) -> &'static str {
    // The tag is what follows the last ':' after the last '/'.
    let last = image.rsplit('/').next().unwrap_or(image);
    let tag = last.split('@').next().unwrap_or(last).rsplit_once(':').map(|(_, t)| t);
    match tag {
        None | Some("latest") if !image.contains('@') => "Always",
        _ => "IfNotPresent",
    }
}

pub fn pod_spec(spec: &mut Value) {
    for field in ["initContainers", "containers"] {
        for c in containers_mut(spec, field) {
            let image = c["image"].as_str().unwrap_or_default().to_owned();
            or_insert(c, "imagePullPolicy", json!(image_pull_policy(&image)));
            or_insert(c, "terminationMessagePath", json!("/dev/termination-log"));
            or_insert(c, "terminationMessagePolicy", json!("File"));
            or_insert(c, "resources", json!({}));
            for p in c.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                or_insert(p, "protocol", json!("TCP"));
            }
        }
    }
    or_insert(spec, "restartPolicy", json!("Always"));
    or_insert(spec, "terminationGracePeriodSeconds", json!(30));
    or_insert(spec, "dnsPolicy", json!("ClusterFirst"));
    or_insert(spec, "securityContext", json!({}));
    or_insert(spec, "schedulerName", json!("default-scheduler"));
    or_insert(spec, "enableServiceLinks", json!(true));
    for v in spec.get_mut("volumes").and_then(Value::as_array_mut).into_iter().flatten() {
        for source in ["configMap", "secret"] {
            if let Some(src) = v.get_mut(source) {
                or_insert(src, "defaultMode", json!(420));
            }
        }
    }
}

pub fn pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    pod_spec(spec);
    let sa = spec.get("serviceAccountName").or_else(|| spec.get("serviceAccount")).cloned();
    let sa = sa.unwrap_or_else(|| json!("default"));
    or_insert(spec, "serviceAccountName", sa.clone());
    or_insert(spec, "serviceAccount", sa);
    // The sandbox's scheduler: one node takes every pod.
    or_insert(spec, "nodeName", json!(layout::NODE_NAME));
    or_insert(spec, "priority", json!(0));
    or_insert(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
}

pub fn deployment(d: &mut Value) {
    let spec = &mut d["spec"];
    or_insert(spec, "replicas", json!(1));
    or_insert(spec, "revisionHistoryLimit", json!(10));
    or_insert(spec, "progressDeadlineSeconds", json!(600));
    or_insert(spec, "strategy", json!({}));
    let strategy = &mut spec["strategy"];
    or_insert(strategy, "type", json!("RollingUpdate"));
    if strategy["type"] == "RollingUpdate" {
        or_insert(strategy, "rollingUpdate", json!({}));
        or_insert(&mut strategy["rollingUpdate"], "maxSurge", json!("25%"));
        or_insert(&mut strategy["rollingUpdate"], "maxUnavailable", json!("25%"));
    }
    if let Some(t) = spec.pointer_mut("/template/spec") {
        pod_spec(t);
    }
}

pub fn replicaset(rs: &mut Value) {
    or_insert(&mut rs["spec"], "replicas", json!(1));
    if let Some(t) = rs.pointer_mut("/spec/template/spec") {
        pod_spec(t);
    }
}

pub fn service(svc: &mut Value) {
    let spec = &mut svc["spec"];
    or_insert(spec, "type", json!("ClusterIP"));
    if spec["type"] == "ExternalName" {
        return;
    }
    or_insert(spec, "sessionAffinity", json!("None"));
    or_insert(spec, "ipFamilies", json!(["IPv4"]));
    or_insert(spec, "ipFamilyPolicy", json!("SingleStack"));
    or_insert(spec, "internalTrafficPolicy", json!("Cluster"));
    if spec["type"] == "NodePort" || spec["type"] == "LoadBalancer" {
        or_insert(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    for p in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
        or_insert(p, "protocol", json!("TCP"));
        let port = p["port"].clone();
        or_insert(p, "targetPort", port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_follows_the_tag() {
        assert_eq!(image_pull_policy("busybox"), "Always");
        assert_eq!(image_pull_policy("tpd-test/echo:latest"), "Always");
        assert_eq!(image_pull_policy("localhost:5000/echo"), "Always");
        assert_eq!(image_pull_policy("tpd/agent:0.1.0"), "IfNotPresent");
        assert_eq!(image_pull_policy("x@sha256:ab"), "IfNotPresent");
    }

    #[test]
    fn deployments_get_strategy_and_template_defaults() {
        let mut d = json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x:1"}]}}}});
        deployment(&mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    }
}
