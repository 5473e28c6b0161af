//! Services and cluster DNS for the sandbox (the kube-proxy and CoreDNS
//! parts of a cluster).
//!
//! The sandbox process runs on the host, on the same L2 network as the pods
//! (the instance's Docker bridge). Every ClusterIP is given to the host as a
//! /32 on that bridge and served by userspace proxies bound to it, so a pod
//! reaching a service talks to the host (INPUT), never across the internal
//! network's isolation rules (FORWARD). Cluster DNS is one more such address.
//! NodePorts listen on all host addresses. The addresses go away with the
//! bridge when the network is removed.

mod dns;
mod dns_serve;
mod proxy;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Service, ServicePort};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::layout;

/// The cluster's services and endpoints, as watched from the API server.
#[derive(Clone)]
struct Cluster {
    services: Store<Service>,
    endpoints: Store<Endpoints>,
}

/// Starts the service proxies and the DNS server; they follow the API until
/// `shutdown`.
pub async fn start(client: kube::Client, bridge: String, shutdown: CancellationToken) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let services = watch_into_store(Api::<Service>::all(client.clone()), changed.clone(), shutdown.clone());
    let endpoints = watch_into_store(Api::<Endpoints>::all(client), changed.clone(), shutdown.clone());
    let cluster = Cluster { services, endpoints };

    add_address(&bridge, layout::DNS_SERVICE_IP).await?;
    let dns_addr = SocketAddr::new(IpAddr::V4(layout::DNS_SERVICE_IP), 53);
    let udp = UdpSocket::bind(dns_addr).await.with_context(|| format!("binding cluster DNS on udp {dns_addr}"))?;
    let tcp = TcpListener::bind(dns_addr).await.with_context(|| format!("binding cluster DNS on tcp {dns_addr}"))?;
    let upstream = dns::upstreams(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()).into_iter().next();
    let server = dns_serve::Server { cluster: cluster.clone(), upstream };
    tokio::spawn(server.clone().serve_udp(udp, shutdown.clone()));
    tokio::spawn(server.serve_tcp(tcp, shutdown.clone()));
    tokio::spawn(reconcile_loop(cluster, bridge, changed, shutdown));
    Ok(())
}

fn watch_into_store<K>(api: Api<K>, changed: Arc<Notify>, shutdown: CancellationToken) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let mut stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .boxed();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                item = stream.next() => match item {
                    None => return,
                    Some(Ok(_)) => changed.notify_one(),
                    Some(Err(e)) => tracing::debug!(error = %e, "service/endpoints watch"),
                },
            }
        }
    });
    reader
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

/// A socket the proxies listen on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Listen {
    ClusterIp(Ipv4Addr, u16, Proto),
    NodePort(u16, Proto),
}

/// The service port a listener serves.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    namespace: String,
    service: String,
    port: ServicePort,
}

/// The listeners the current services call for (pure).
fn desired(services: &[Arc<Service>]) -> BTreeMap<Listen, Target> {
    let mut out = BTreeMap::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ip: Option<Ipv4Addr> = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok());
        for port in spec.ports.iter().flatten() {
            let proto = match port.protocol.as_deref() {
                Some("UDP") => Proto::Udp,
                None | Some("TCP") => Proto::Tcp,
                Some(_) => continue,
            };
            let target = Target {
                namespace: svc.metadata.namespace.clone().unwrap_or_default(),
                service: svc.metadata.name.clone().unwrap_or_default(),
                port: port.clone(),
            };
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            if let Some(ip) = ip {
                out.insert(Listen::ClusterIp(ip, number, proto), target.clone());
            }
            if let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()) {
                out.insert(Listen::NodePort(node_port, proto), target);
            }
        }
    }
    out
}

/// Endpoint addresses for a service port: the Endpoints port with the same
/// name (the controller resolved named targetPorts), or the only one.
fn endpoints_for(endpoints: Option<&Endpoints>, port: &ServicePort) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let want = port.name.as_deref().unwrap_or("");
    let proto = port.protocol.as_deref().unwrap_or("TCP");
    for subset in endpoints.into_iter().flat_map(|e| e.subsets.iter().flatten()) {
        let ports = subset.ports.as_deref().unwrap_or_default();
        let matching = ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == want && p.protocol.as_deref().unwrap_or("TCP") == proto)
            .or_else(|| (ports.len() == 1).then(|| &ports[0]));
        let Some(number) = matching.and_then(|p| u16::try_from(p.port).ok()) else {
            continue;
        };
        for addr in subset.addresses.iter().flatten() {
            if let Ok(ip) = addr.ip.parse::<IpAddr>() {
                out.push(SocketAddr::new(ip, number));
            }
        }
    }
    out
}

struct LiveBackends {
    cluster: Cluster,
    /// The service port as it is now: a change to it (a new targetPort)
    /// takes effect for the next connection, on the same listener.
    target: watch::Receiver<Target>,
}

impl proxy::Backends for LiveBackends {
    fn backends(&self) -> Vec<SocketAddr> {
        let target = self.target.borrow();
        let key = ObjectRef::<Endpoints>::new(&target.service).within(&target.namespace);
        endpoints_for(self.cluster.endpoints.get(&key).as_deref(), &target.port)
    }
}

/// Keeps the listeners (and the host addresses they bind) in line with the
/// services. A listener lives as long as its address, port and protocol
/// do; a change to what it serves (the Service's targetPort, say) is
/// handed to it, as kube-proxy rewrites its rules in place: closing and
/// binding again would refuse the connections that arrive in between.
async fn reconcile_loop(cluster: Cluster, bridge: String, changed: Arc<Notify>, shutdown: CancellationToken) {
    let mut running: HashMap<Listen, (watch::Sender<Target>, CancellationToken)> = HashMap::new();
    loop {
        let want = desired(&cluster.services.state());
        running.retain(|listen, (_, stop)| {
            let keep = want.contains_key(listen);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (listen, target) in want {
            if let Some((serving, _)) = running.get(&listen) {
                serving.send_if_modified(|now| std::mem::replace(now, target) != *now);
                continue;
            }
            let stop = shutdown.child_token();
            let (serving, watched) = watch::channel(target);
            match bind(&bridge, listen, LiveBackends { cluster: cluster.clone(), target: watched }, stop.clone()).await
            {
                Ok(()) => {
                    running.insert(listen, (serving, stop));
                }
                Err(e) => tracing::warn!(?listen, error = %format!("{e:#}"), "service listener"),
            }
        }
        let mut in_use: Vec<Ipv4Addr> =
            running.keys().filter_map(|l| if let Listen::ClusterIp(ip, ..) = l { Some(*ip) } else { None }).collect();
        in_use.push(layout::DNS_SERVICE_IP);
        remove_unused_addresses(&bridge, &in_use).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = changed.notified() => {}
            // Listeners that failed to bind are retried.
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        // Let a burst of watch events settle into one pass.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bind(bridge: &str, listen: Listen, backends: LiveBackends, stop: CancellationToken) -> anyhow::Result<()> {
    let addr = match listen {
        Listen::ClusterIp(ip, port, _) => {
            add_address(bridge, ip).await?;
            SocketAddr::new(IpAddr::V4(ip), port)
        }
        Listen::NodePort(port, _) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
    };
    match listen {
        Listen::ClusterIp(.., Proto::Tcp) | Listen::NodePort(_, Proto::Tcp) => {
            let l = TcpListener::bind(addr).await.with_context(|| format!("binding tcp {addr}"))?;
            tokio::spawn(proxy::serve_tcp(l, backends, stop));
        }
        Listen::ClusterIp(.., Proto::Udp) | Listen::NodePort(_, Proto::Udp) => {
            let s = UdpSocket::bind(addr).await.with_context(|| format!("binding udp {addr}"))?;
            tokio::spawn(proxy::serve_udp(s, backends, stop));
        }
    }
    Ok(())
}

/// iproute2's `ip`: found on PATH, or in the sbin directories that a
/// non-login shell's PATH often leaves out (CI runners, sudo, cron).
fn ip_binary() -> &'static std::path::Path {
    static IP: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    IP.get_or_init(|| {
        let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
        on_path
            .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(std::path::PathBuf::from))
            .map(|dir| dir.join("ip"))
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| "ip".into())
    })
}

/// Gives the host `ip`/32 on the bridge (idempotent).
async fn add_address(bridge: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(ip_binary())
        .args(["-4", "addr", "replace", &format!("{ip}/32"), "dev", bridge])
        .output()
        .await
        .context("running `ip addr` (iproute2 must be installed and the sandbox must run as root)")?;
    anyhow::ensure!(
        out.status.success(),
        "`ip addr replace {ip}/32 dev {bridge}` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Drops the /32 service addresses on the bridge that no listener uses.
async fn remove_unused_addresses(bridge: &str, in_use: &[Ipv4Addr]) {
    let Ok(out) =
        tokio::process::Command::new(ip_binary()).args(["-4", "-o", "addr", "show", "dev", bridge]).output().await
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(cidr) = line.split_whitespace().skip_while(|w| *w != "inet").nth(1) else {
            continue;
        };
        let Some((ip, "32")) = cidr.split_once('/') else {
            continue;
        };
        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
            continue;
        };
        if !in_use.contains(&ip) {
            let _ = tokio::process::Command::new(ip_binary())
                .args(["-4", "addr", "del", cidr, "dev", bridge])
                .output()
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn listeners_for_cluster_ips_and_node_ports() {
        let svc = Service {
            metadata: ObjectMeta { name: Some("hello".into()), namespace: Some("demo".into()), ..Default::default() },
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.20".into()),
                ports: Some(vec![
                    ServicePort { name: Some("http".into()), port: 80, node_port: Some(30080), ..Default::default() },
                    ServicePort {
                        name: Some("dns".into()),
                        port: 53,
                        protocol: Some("UDP".into()),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let want = desired(&[Arc::new(svc)]);
        let keys: Vec<Listen> = want.keys().copied().collect();
        let ip = Ipv4Addr::new(10, 96, 0, 20);
        assert_eq!(
            keys,
            vec![
                Listen::ClusterIp(ip, 53, Proto::Udp),
                Listen::ClusterIp(ip, 80, Proto::Tcp),
                Listen::NodePort(30080, Proto::Tcp)
            ]
        );
    }

    #[test]
    fn endpoints_match_port_by_name() {
        let eps = Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![EndpointAddress { ip: "10.100.0.4".into(), ..Default::default() }]),
                ports: Some(vec![
                    EndpointPort { name: Some("http".into()), port: 8080, ..Default::default() },
                    EndpointPort { name: Some("admin".into()), port: 9090, ..Default::default() },
                ]),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let port = ServicePort { name: Some("admin".into()), port: 90, ..Default::default() };
        assert_eq!(endpoints_for(Some(&eps), &port), vec!["10.100.0.4:9090".parse().expect("addr")]);
        assert!(endpoints_for(None, &port).is_empty());
    }
}
