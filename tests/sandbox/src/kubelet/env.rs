//! A container's environment, computed as the kubelet does: service links,
//! then `envFrom`, then `env` (with `$(VAR)` expansion), from objects the
//! caller fetched. Pure: no IO.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, ObjectFieldSelector, Pod, Secret, Service};

/// The API objects a pod's env and volumes refer to, by name, in its namespace.
#[derive(Debug, Default, Clone)]
pub struct PodSources {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
    /// Services of the pod's namespace, plus `default/kubernetes`.
    pub services: Vec<Service>,
    pub pod_ip: String,
    pub host_ip: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("configmap \"{0}\" not found")]
    ConfigMapMissing(String),
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKeyMissing { namespace: String, name: String, key: String },
    #[error("secret \"{0}\" not found")]
    SecretMissing(String),
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKeyMissing { namespace: String, name: String, key: String },
    #[error("unsupported fieldPath {0}")]
    FieldPath(String),
    #[error("resourceFieldRef is not supported by the sandbox node")]
    ResourceField,
}

/// The environment of `container` in `pod`, in definition order.
pub fn container_env(pod: &Pod, container: &Container, src: &PodSources) -> Result<Vec<(String, String)>, EnvError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links).unwrap_or(true);
    let service_env = service_links(ns, links, &src.services);

    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = env.iter_mut().find(|(name, _)| *name == k) {
            slot.1 = v;
        } else {
            env.push((k, v));
        }
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or("");
        if let Some(r) = &from.config_map_ref {
            match src.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::ConfigMapMissing(r.name.clone())),
            }
        }
        if let Some(r) = &from.secret_ref {
            match src.secrets.get(&r.name) {
                Some(s) => {
                    for (k, v) in s.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned());
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(EnvError::SecretMissing(r.name.clone())),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => {
                let known = |name: &str| {
                    env.iter()
                        .rev()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                        .or_else(|| service_env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                };
                Some(expand(v, known))
            }
            (None, Some(from)) => value_from(pod, ns, from, src)?,
            (None, None) => Some(String::new()),
        };
        if let Some(value) = value {
            set(&mut env, var.name.clone(), value);
        }
    }
    for (k, v) in service_env {
        if !env.iter().any(|(name, _)| *name == k) {
            env.push((k, v));
        }
    }
    Ok(env)
}

fn value_from(
    pod: &Pod,
    ns: &str,
    from: &k8s_openapi::api::core::v1::EnvVarSource,
    src: &PodSources,
) -> Result<Option<String>, EnvError> {
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional == Some(true);
        return match src.config_maps.get(&r.name) {
            Some(cm) => match cm.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => Ok(Some(v.clone())),
                None if optional => Ok(None),
                None => Err(EnvError::ConfigMapKeyMissing {
                    namespace: ns.into(),
                    name: r.name.clone(),
                    key: r.key.clone(),
                }),
            },
            None if optional => Ok(None),
            None => Err(EnvError::ConfigMapMissing(r.name.clone())),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional == Some(true);
        return match src.secrets.get(&r.name) {
            Some(s) => match s.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v.0).into_owned())),
                None if optional => Ok(None),
                None => {
                    Err(EnvError::SecretKeyMissing { namespace: ns.into(), name: r.name.clone(), key: r.key.clone() })
                }
            },
            None if optional => Ok(None),
            None => Err(EnvError::SecretMissing(r.name.clone())),
        };
    }
    if let Some(f) = &from.field_ref {
        return field_value(pod, f, src).map(Some);
    }
    if from.resource_field_ref.is_some() {
        return Err(EnvError::ResourceField);
    }
    Ok(Some(String::new()))
}

/// The downward API: the value of a pod field.
pub fn field_value(pod: &Pod, f: &ObjectFieldSelector, src: &PodSources) -> Result<String, EnvError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = f.field_path.as_str();
    let keyed = |prefix: &str| -> Option<String> {
        path.strip_prefix(prefix)?.strip_prefix("['")?.strip_suffix("']").map(str::to_owned)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => {
            spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into())
        }
        "status.podIP" | "status.podIPs" => src.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => src.host_ip.clone(),
        _ => {
            if let Some(key) = keyed("metadata.labels") {
                meta.labels.as_ref().and_then(|l| l.get(&key)).cloned().unwrap_or_default()
            } else if let Some(key) = keyed("metadata.annotations") {
                meta.annotations.as_ref().and_then(|l| l.get(&key)).cloned().unwrap_or_default()
            } else {
                return Err(EnvError::FieldPath(path.into()));
            }
        }
    })
}

/// `key="value"` lines, sorted, as the downward API writes labels.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter().flatten().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join("\n")
}

/// Docker-links-style variables for the services a pod may see: those of
/// its namespace when service links are on, and always `kubernetes`.
pub fn service_links(ns: &str, enabled: bool, services: &[Service]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for svc in services {
        let svc_ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let name = svc.metadata.name.as_deref().unwrap_or_default();
        let master = svc_ns == "default" && name == "kubernetes";
        if !(master || (enabled && svc_ns == ns)) {
            continue;
        }
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else {
            continue;
        };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let prefix = name.to_uppercase().replace('-', "_");
        out.push((format!("{prefix}_SERVICE_HOST"), ip.to_owned()));
        out.push((format!("{prefix}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(pname) = p.name.as_deref().filter(|n| !n.is_empty()) {
                out.push((
                    format!("{prefix}_SERVICE_PORT_{}", pname.to_uppercase().replace('-', "_")),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        out.push((format!("{prefix}_PORT"), format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port)));
        for p in ports {
            let proto = proto(p);
            let base = format!("{prefix}_PORT_{}_{}", p.port, proto.to_uppercase());
            out.push((base.clone(), format!("{}://{ip}:{}", proto.to_lowercase(), p.port)));
            out.push((format!("{base}_PROTO"), proto.to_lowercase()));
            out.push((format!("{base}_PORT"), p.port.to_string()));
            out.push((format!("{base}_ADDR"), ip.to_owned()));
        }
    }
    out
}

/// Kubernetes' `$(VAR)` expansion: `$$` escapes, unknown references stay.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EnvFromSource, EnvVar, EnvVarSource, SecretKeySelector, ServicePort, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(ns: &str, name: &str, ip: &str, ports: &[(Option<&str>, i32)]) -> Service {
        Service {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..Default::default() },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p)| ServicePort {
                            name: n.map(Into::into),
                            port: *p,
                            protocol: Some("TCP".into()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(ns: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some(ns.into()),
                labels: Some([("app".to_owned(), "x".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn service_links_like_the_kubelet() {
        let services = vec![
            svc("default", "kubernetes", "10.96.0.1", &[(Some("https"), 443)]),
            svc("demo", "hello-web", "10.96.0.20", &[(Some("http"), 80), (None, 81)]),
            svc("other", "nope", "10.96.0.30", &[(None, 1)]),
        ];
        let env: BTreeMap<_, _> = service_links("demo", true, &services).into_iter().collect();
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], "10.96.0.1");
        assert_eq!(env["KUBERNETES_SERVICE_PORT_HTTPS"], "443");
        assert_eq!(env["HELLO_WEB_SERVICE_HOST"], "10.96.0.20");
        assert_eq!(env["HELLO_WEB_SERVICE_PORT"], "80");
        assert_eq!(env["HELLO_WEB_SERVICE_PORT_HTTP"], "80");
        assert_eq!(env["HELLO_WEB_PORT"], "tcp://10.96.0.20:80");
        assert_eq!(env["HELLO_WEB_PORT_81_TCP_ADDR"], "10.96.0.20");
        assert_eq!(env["HELLO_WEB_PORT_80_TCP_PROTO"], "tcp");
        assert!(!env.contains_key("NOPE_SERVICE_HOST"));
        let off: BTreeMap<_, _> = service_links("demo", false, &services).into_iter().collect();
        assert!(off.contains_key("KUBERNETES_SERVICE_HOST") && !off.contains_key("HELLO_WEB_SERVICE_HOST"));
    }

    #[test]
    fn env_order_expansion_and_sources() {
        let mut src = PodSources { pod_ip: "10.100.0.7".into(), ..Default::default() };
        src.secrets.insert(
            "s".into(),
            Secret {
                data: Some([("PASS".to_owned(), k8s_openapi::ByteString(b"hunter2".to_vec()))].into()),
                ..Default::default()
            },
        );
        src.config_maps.insert(
            "c".into(),
            ConfigMap { data: Some([("MODE".to_owned(), "fast".to_owned())].into()), ..Default::default() },
        );
        let c = Container {
            name: "app".into(),
            env_from: Some(vec![EnvFromSource {
                prefix: Some("CM_".into()),
                config_map_ref: Some(k8s_openapi::api::core::v1::ConfigMapEnvSource {
                    name: "c".into(),
                    optional: None,
                }),
                ..Default::default()
            }]),
            env: Some(vec![
                EnvVar {
                    name: "A".into(),
                    value: Some("x$(CM_MODE)-$$(CM_MODE)-$(NOPE)".into()),
                    ..Default::default()
                },
                EnvVar {
                    name: "P".into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "s".into(),
                            key: "PASS".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "IP".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector { field_path: "status.podIP".into(), api_version: None }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                EnvVar {
                    name: "APP".into(),
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.labels['app']".into(),
                            api_version: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let env: BTreeMap<_, _> = container_env(&pod("demo"), &c, &src).expect("env").into_iter().collect();
        assert_eq!(env["CM_MODE"], "fast");
        assert_eq!(env["A"], "xfast-$(CM_MODE)-$(NOPE)");
        assert_eq!(env["P"], "hunter2");
        assert_eq!(env["IP"], "10.100.0.7");
        assert_eq!(env["APP"], "x");

        let missing = Container {
            env: Some(vec![EnvVar {
                name: "P".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector { name: "gone".into(), key: "k".into(), optional: None }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..c
        };
        assert_eq!(container_env(&pod("demo"), &missing, &src), Err(EnvError::SecretMissing("gone".into())));
    }

    #[test]
    fn expansion_edge_cases() {
        let look = |n: &str| (n == "X").then(|| "1".to_owned());
        assert_eq!(expand("$(X)$(X)", look), "11");
        assert_eq!(expand("$", look), "$");
        assert_eq!(expand("$(X", look), "$(X");
        assert_eq!(expand("a$$b", look), "a$b");
    }
}
