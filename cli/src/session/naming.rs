//! How the session's network namespace names things, as the kubelet would
//! for the pod: its hostname (the agent pod's name, or the pod spec's
//! `hostname` and `subdomain`), the `hostAliases` in /etc/hosts, and the
//! resolver's search path and options from `dnsPolicy` and `dnsConfig`.
//! Pure; the sidecar container carries the result, and the developer's
//! container, which joins its network namespace, gets the same files.
//!
//! The nameserver is always the sidecar's (127.0.0.1), which sends cluster
//! names through the tunnel and the rest to the host's resolver; the
//! `dnsConfig.nameservers` a pod adds are not reachable from here.

use k8s_openapi::api::core::v1::PodSpec;

/// The cluster domain the search path is built on.
const CLUSTER_DOMAIN: &str = "cluster.local";

/// What the sidecar container is created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub hostname: String,
    /// `SUBDOMAIN.NAMESPACE.svc.cluster.local` for a pod with a subdomain.
    pub domainname: Option<String>,
    /// `NAME:IP`, Docker's form of an /etc/hosts entry.
    pub extra_hosts: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

/// The naming of a pod `pod_name` in `namespace` with `spec` (none for the
/// outbound-only agent pod, which stands in for no pod of the user's).
pub fn naming(spec: Option<&PodSpec>, pod_name: &str, namespace: &str) -> Naming {
    let hostname = spec.and_then(|s| s.hostname.clone()).unwrap_or_else(|| pod_name.chars().take(63).collect());
    let domainname = spec
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty())
        .map(|sub| format!("{sub}.{namespace}.svc.{CLUSTER_DOMAIN}"));
    let extra_hosts = spec
        .and_then(|s| s.host_aliases.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|a| a.hostnames.iter().flatten().map(move |h| format!("{h}:{}", a.ip)))
        .collect();
    let policy = spec.and_then(|s| s.dns_policy.as_deref()).unwrap_or("ClusterFirst");
    let (mut search, mut options) = match policy {
        // `Default` is the node's resolver and `None` only what dnsConfig
        // says; neither gets the cluster's search path.
        "Default" | "None" => (Vec::new(), Vec::new()),
        _ => (cluster_search(namespace), vec!["ndots:5".to_owned()]),
    };
    if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
        for s in config.searches.iter().flatten() {
            if !search.contains(s) {
                search.push(s.clone());
            }
        }
        for o in config.options.iter().flatten() {
            let Some(name) = o.name.as_deref() else { continue };
            // A later option of the same name replaces the earlier, as the kubelet merges them.
            options.retain(|have| option_name(have) != name);
            options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.to_owned(),
            });
        }
    }
    Naming { hostname, domainname, extra_hosts, search, options }
}

fn cluster_search(namespace: &str) -> Vec<String> {
    vec![format!("{namespace}.svc.{CLUSTER_DOMAIN}"), format!("svc.{CLUSTER_DOMAIN}"), CLUSTER_DOMAIN.to_owned()]
}

fn option_name(option: &str) -> &str {
    option.split_once(':').map_or(option, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{HostAlias, PodDNSConfig, PodDNSConfigOption};

    use super::*;

    fn option(name: &str, value: Option<&str>) -> PodDNSConfigOption {
        PodDNSConfigOption { name: Some(name.into()), value: value.map(str::to_owned) }
    }

    #[test]
    fn a_plain_pod_is_named_as_its_pod_with_the_cluster_search_path() {
        let n = naming(Some(&PodSpec::default()), "hello-5d8f-x2x7q", "shop");
        assert_eq!(n.hostname, "hello-5d8f-x2x7q");
        assert_eq!(n.domainname, None);
        assert!(n.extra_hosts.is_empty());
        assert_eq!(n.search, ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]);
        assert_eq!(n.options, ["ndots:5"]);
        assert_eq!(naming(None, "tpd-agent-1", "shop"), n.clone_with_hostname("tpd-agent-1"));
    }

    #[test]
    fn hostname_subdomain_aliases_and_dns_config_as_the_kubelet_writes_them() {
        let spec = PodSpec {
            hostname: Some("api-0".into()),
            subdomain: Some("workers".into()),
            host_aliases: Some(vec![HostAlias {
                ip: "10.1.2.3".into(),
                hostnames: Some(vec!["db.internal".into(), "cache.internal".into()]),
            }]),
            dns_config: Some(PodDNSConfig {
                searches: Some(vec!["corp.example".into(), "svc.cluster.local".into()]),
                options: Some(vec![option("ndots", Some("2")), option("edns0", None)]),
                nameservers: None,
            }),
            ..Default::default()
        };
        let n = naming(Some(&spec), "api-7c9-abcde", "shop");
        assert_eq!(n.hostname, "api-0");
        assert_eq!(n.domainname.as_deref(), Some("workers.shop.svc.cluster.local"));
        assert_eq!(n.extra_hosts, ["db.internal:10.1.2.3", "cache.internal:10.1.2.3"]);
        assert_eq!(n.search, ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local", "corp.example"]);
        assert_eq!(n.options, ["ndots:2", "edns0"]);
    }

    #[test]
    fn policy_none_takes_only_the_dns_config() {
        let spec = PodSpec {
            dns_policy: Some("None".into()),
            dns_config: Some(PodDNSConfig {
                searches: Some(vec!["corp.example".into()]),
                options: Some(vec![option("timeout", Some("1"))]),
                nameservers: Some(vec!["192.0.2.53".into()]),
            }),
            ..Default::default()
        };
        let n = naming(Some(&spec), "p", "shop");
        assert_eq!(n.search, ["corp.example"]);
        assert_eq!(n.options, ["timeout:1"]);
        let default = PodSpec { dns_policy: Some("Default".into()), ..Default::default() };
        assert!(naming(Some(&default), "p", "shop").search.is_empty());
    }

    impl Naming {
        fn clone_with_hostname(&self, hostname: &str) -> Naming {
            Naming { hostname: hostname.into(), ..self.clone() }
        }
    }
}
