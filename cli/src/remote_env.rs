//! The environment Kubernetes gives a container, computed from API objects
//! the way the kubelet does it, with no IO: service links, then `envFrom`,
//! then `env` (with `valueFrom` and `$(VAR)` references). `tpd env` uses it
//! without starting a session. Values may be secrets: nothing here logs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret, Service};
use tpd_wire::names::agent_env;

pub type Env = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{var}: {kind} {name:?} does not exist (the pod cannot start either)")]
    MissingObject { var: String, kind: &'static str, name: String },
    #[error("{var}: key {key:?} is not in {kind} {name:?}")]
    MissingKey { var: String, kind: &'static str, name: String, key: String },
}

/// The objects the env may refer to, by name, from the pod's namespace.
#[derive(Debug, Default)]
pub struct Sources {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
    /// Services whose links the kubelet injects (the pod's namespace, plus
    /// `kubernetes` from `default`).
    pub services: Vec<Service>,
}

/// `container`'s env in `pod`, minus tpd's own variables. Variables the
/// kubelet computes from resources (`resourceFieldRef`) are left out.
pub fn resolve(pod: &Pod, container: &Container, sources: &Sources) -> Result<Env, Error> {
    let mut env = Env::new();
    if pod.spec.as_ref().and_then(|s| s.enable_service_links) != Some(false) {
        for svc in &sources.services {
            env.extend(service_links(svc));
        }
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        if let Some(r) = &from.config_map_ref {
            match sources.config_maps.get(&r.name) {
                Some(cm) => env.extend(cm.data.iter().flatten().map(|(k, v)| (format!("{prefix}{k}"), v.clone()))),
                None if r.optional == Some(true) => {}
                None => {
                    return Err(Error::MissingObject {
                        var: "envFrom".into(),
                        kind: "ConfigMap",
                        name: r.name.clone(),
                    });
                }
            }
        }
        if let Some(r) = &from.secret_ref {
            match sources.secrets.get(&r.name) {
                Some(s) => env.extend(
                    s.data
                        .iter()
                        .flatten()
                        .map(|(k, v)| (format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned())),
                ),
                None if r.optional == Some(true) => {}
                None => {
                    return Err(Error::MissingObject { var: "envFrom".into(), kind: "Secret", name: r.name.clone() });
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = value_of(var, pod, sources, &env)? {
            env.insert(var.name.clone(), value);
        }
    }
    env.retain(|k, _| !agent_env::ALL.contains(&k.as_str()));
    Ok(env)
}

fn value_of(var: &EnvVar, pod: &Pod, sources: &Sources, env: &Env) -> Result<Option<String>, Error> {
    if let Some(value) = &var.value {
        return Ok(Some(expand(value, env)));
    }
    let Some(from) = &var.value_from else {
        return Ok(Some(String::new()));
    };
    let name = || var.name.clone();
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional == Some(true);
        return match sources.config_maps.get(&r.name) {
            Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => Ok(Some(v.clone())),
                None if optional => Ok(None),
                None => {
                    Err(Error::MissingKey { var: name(), kind: "ConfigMap", name: r.name.clone(), key: r.key.clone() })
                }
            },
            None if optional => Ok(None),
            None => Err(Error::MissingObject { var: name(), kind: "ConfigMap", name: r.name.clone() }),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional == Some(true);
        return match sources.secrets.get(&r.name) {
            Some(s) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v.0).into_owned())),
                None if optional => Ok(None),
                None => {
                    Err(Error::MissingKey { var: name(), kind: "Secret", name: r.name.clone(), key: r.key.clone() })
                }
            },
            None if optional => Ok(None),
            None => Err(Error::MissingObject { var: name(), kind: "Secret", name: r.name.clone() }),
        };
    }
    Ok(from.field_ref.as_ref().and_then(|f| field(pod, &f.field_path)))
}

/// The downward API's `fieldRef` paths.
fn field(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let keyed = |prefix: &str| path.strip_prefix(prefix)?.strip_suffix("']").map(str::to_owned);
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec?.node_name.clone(),
        "spec.serviceAccountName" => spec?.service_account_name.clone(),
        "status.podIP" => status?.pod_ip.clone(),
        "status.hostIP" => status?.host_ip.clone(),
        "status.podIPs" => Some(status?.pod_ips.iter().flatten().map(|p| p.ip.clone()).collect::<Vec<_>>().join(",")),
        _ => {
            if let Some(k) = keyed("metadata.labels['") {
                return meta.labels.as_ref()?.get(&k).cloned();
            }
            meta.annotations.as_ref()?.get(&keyed("metadata.annotations['")?).cloned()
        }
    }
}

/// Kubernetes' `$(VAR)` references to variables defined before; `$$` is a
/// literal `$`; unknown references stay as written.
fn expand(value: &str, env: &Env) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')')) {
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The Docker-links-style variables the kubelet sets for a Service.
fn service_links(svc: &Service) -> Vec<(String, String)> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ip = match spec.cluster_ip.as_deref() {
        Some(ip) if !ip.is_empty() && ip != "None" => ip,
        _ => return Vec::new(),
    };
    let ports = spec.ports.as_deref().unwrap_or_default();
    let Some(first) = ports.first() else {
        return Vec::new();
    };
    let n = svc.metadata.name.as_deref().unwrap_or_default().to_uppercase().replace('-', "_");
    let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.as_deref().unwrap_or("TCP").to_owned();
    let mut vars = vec![
        (format!("{n}_SERVICE_HOST"), ip.to_owned()),
        (format!("{n}_SERVICE_PORT"), first.port.to_string()),
        (format!("{n}_PORT"), format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port)),
    ];
    for p in ports {
        let (proto, port) = (proto(p), p.port);
        if let Some(name) = &p.name {
            vars.push((format!("{n}_SERVICE_PORT_{}", name.to_uppercase().replace('-', "_")), port.to_string()));
        }
        let base = format!("{n}_PORT_{port}_{proto}");
        vars.push((base.clone(), format!("{}://{ip}:{port}", proto.to_lowercase())));
        vars.push((format!("{base}_PROTO"), proto.to_lowercase()));
        vars.push((format!("{base}_PORT"), port.to_string()));
        vars.push((format!("{base}_ADDR"), ip.to_owned()));
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn pod() -> Pod {
        json(serde_json::json!({
            "metadata": {"name": "shop-7d9f-abcde", "namespace": "store", "uid": "u-1", "labels": {"app": "shop"}, "annotations": {"team": "web"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "shop", "containers": [{"name": "shop"}]},
            "status": {"podIP": "10.100.0.7", "hostIP": "10.111.255.254"}
        }))
    }

    fn sources() -> Sources {
        let cm: ConfigMap =
            json(serde_json::json!({"metadata": {"name": "shop-config"}, "data": {"MODE": "prod", "LEVEL": "3"}}));
        let mut secret: Secret = json(serde_json::json!({"metadata": {"name": "shop-db"}}));
        secret.data = Some(BTreeMap::from([("password".to_owned(), ByteString(b"s3cret".to_vec()))]));
        let svc: Service = json(
            serde_json::json!({"metadata": {"name": "pay-api"}, "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        );
        let headless: Service = json(
            serde_json::json!({"metadata": {"name": "db"}, "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}),
        );
        Sources {
            config_maps: BTreeMap::from([("shop-config".to_owned(), cm)]),
            secrets: BTreeMap::from([("shop-db".to_owned(), secret)]),
            services: vec![svc, headless],
        }
    }

    fn container(env: serde_json::Value) -> Container {
        json(
            serde_json::json!({"name": "shop", "envFrom": [{"configMapRef": {"name": "shop-config"}, "prefix": "CFG_"}], "env": env}),
        )
    }

    #[test]
    fn env_as_the_kubelet_computes_it() {
        let c = container(serde_json::json!([
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "shop-db", "key": "password"}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "shop-config", "key": "LEVEL"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "URL", "value": "http://$(POD):$(PAY_API_SERVICE_PORT)/$(NOPE)/$$(POD)"},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": true}}},
            {"name": agent_env::SESSION, "value": "s1"}
        ]));
        let env = resolve(&pod(), &c, &sources()).unwrap();
        let get = |k: &str| env.get(k).map(String::as_str);
        assert_eq!(get("DB_PASSWORD"), Some("s3cret"));
        assert_eq!((get("CFG_MODE"), get("LEVEL")), (Some("prod"), Some("3")));
        assert_eq!((get("POD"), get("IP"), get("APP")), (Some("shop-7d9f-abcde"), Some("10.100.0.7"), Some("shop")));
        assert_eq!(get("URL"), Some("http://shop-7d9f-abcde:80/$(NOPE)/$(POD)"));
        assert_eq!((get("OPT"), get(agent_env::SESSION)), (None, None));
        assert_eq!(get("PAY_API_SERVICE_HOST"), Some("10.96.0.20"));
        assert_eq!(get("PAY_API_SERVICE_PORT_HTTP"), Some("80"));
        assert_eq!(get("PAY_API_PORT_80_TCP"), Some("tcp://10.96.0.20:80"));
        assert_eq!(get("DB_SERVICE_HOST"), None, "headless services get no links");
    }

    #[test]
    fn missing_required_sources_are_errors() {
        let c = container(
            serde_json::json!([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "shop-db", "key": "user"}}}]),
        );
        assert_eq!(
            resolve(&pod(), &c, &sources()),
            Err(Error::MissingKey { var: "X".into(), kind: "Secret", name: "shop-db".into(), key: "user".into() })
        );
        let c = container(
            serde_json::json!([{"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "gone", "key": "k"}}}]),
        );
        assert!(matches!(resolve(&pod(), &c, &sources()), Err(Error::MissingObject { kind: "ConfigMap", .. })));
    }

    #[test]
    fn service_links_can_be_turned_off() {
        let mut p = pod();
        p.spec.as_mut().unwrap().enable_service_links = Some(false);
        let env = resolve(&p, &container(serde_json::json!([])), &sources()).unwrap();
        assert!(!env.keys().any(|k| k.starts_with("PAY_API")));
    }
}
