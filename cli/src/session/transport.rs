//! How the session's WireGuard datagrams reach the agent (`--transport`).
//!
//! The hello (each side's fresh public key) always goes over the relay's
//! port-forward stream, which Kubernetes authenticates; nothing about the
//! keys is put in the spec, env or annotations. What differs is what carries
//! WireGuard afterwards:
//!
//! - `portforward`: frames over that same stream, relayed by the CLI.
//! - `udp`: datagrams to a NodePort Service tpd creates for the session
//!   (labelled with the session, so every cleanup path deletes it with the
//!   session's other cluster objects), selecting the agent pod's UDP port.
//! - `auto`: `udp`, but the sidecar moves WireGuard onto the stream when the
//!   first handshake gets no answer over UDP within [`UDP_FALLBACK`]; and a
//!   cluster where the Service cannot be made ready goes straight to the
//!   port-forward.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use tpd_wire::names;
use tpd_wire::sidecar::Carrier;
use tracing::{debug, info};

use crate::cli::Transport;
use crate::cluster::Cluster;
use crate::error::Hint;

/// How long `auto` lets the first handshake wait for an answer over UDP.
pub const UDP_FALLBACK: Duration = Duration::from_secs(2);
/// How long the NodePort Service may take to select the agent pod.
const ENDPOINTS_TIMEOUT: Duration = Duration::from_secs(10);

/// What the sidecar is told to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    PortForward,
    Udp {
        /// The session's NodePort Service.
        service: String,
        /// A node's address and the Service's nodePort.
        at: SocketAddr,
        /// `auto`: fall back to the stream when UDP does not answer in time.
        fallback: Option<Duration>,
    },
}

/// The transport that carries a ready session, as `tpd status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Used {
    Udp,
    Portforward,
}

/// The CLI carries the sidecar's stream over a port-forward.
impl From<Carrier> for Used {
    fn from(carrier: Carrier) -> Self {
        match carrier {
            Carrier::Udp => Used::Udp,
            Carrier::Stream => Used::Portforward,
        }
    }
}

impl std::fmt::Display for Used {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Used::Udp => "udp",
            Used::Portforward => "port-forward",
        })
    }
}

/// The name of the session's NodePort Service.
pub fn service_name(session: &str) -> String {
    format!("tpd-transport-{session}")
}

/// Prepares what `choice` needs in the cluster. `auto` never fails here: a
/// cluster that refuses the Service (RBAC, quota, no NodePorts) gets the
/// port-forward, and the reason goes to the log.
pub async fn prepare(cluster: &Cluster, choice: Transport, session: &str, agent_pod: &str) -> anyhow::Result<Plan> {
    let fallback = match choice {
        Transport::Portforward => return Ok(Plan::PortForward),
        Transport::Udp => None,
        Transport::Auto => Some(UDP_FALLBACK),
    };
    match node_port(cluster, session, agent_pod).await {
        Ok((service, at)) => {
            info!(%service, %at, "UDP transport: NodePort service ready");
            Ok(Plan::Udp { service, at, fallback })
        }
        Err(e) if fallback.is_some() => {
            info!("UDP transport not available ({e:#}); using the port-forward");
            delete_service(cluster, session).await;
            Ok(Plan::PortForward)
        }
        Err(e) => Err(Hint::new(
            format!("cannot set up the UDP transport: {e:#}"),
            "use `--transport portforward` (works on every cluster), or `--transport auto`",
        )
        .into()),
    }
}

/// After `auto` fell back: the NodePort is of no use, so it goes now rather
/// than at the end of the session (cleanup would delete it anyway).
pub async fn release_unused(cluster: &Cluster, session: &str) {
    delete_service(cluster, session).await;
}

async fn delete_service(cluster: &Cluster, session: &str) {
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    match services.delete(&service_name(session), &DeleteParams::default()).await {
        Ok(_) => debug!("deleted the unused NodePort service"),
        Err(e) => debug!("the NodePort service was not deleted now ({e}); cleanup deletes it"),
    }
}

/// Creates the NodePort Service, waits until it selects the agent pod, and
/// returns the address of the agent pod's node with the allocated port.
async fn node_port(cluster: &Cluster, session: &str, agent_pod: &str) -> anyhow::Result<(String, SocketAddr)> {
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let name = service_name(session);
    // The node's address is read while the Service is created: two round
    // trips to the API server instead of three.
    let (service, post) = (node_port_service(&cluster.namespace, session), PostParams::default());
    let (created, ip) = tokio::join!(services.create(&post, &service), node_address(cluster, agent_pod));
    let created = created.with_context(|| format!("cannot create service/{name}"))?;
    let port = created
        .spec
        .and_then(|s| s.ports)
        .into_iter()
        .flatten()
        .find_map(|p| p.node_port)
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("service/{name} got no nodePort"))?;
    let ip = ip?;
    wait_for_endpoint(cluster, &name).await?;
    Ok((name, SocketAddr::new(ip, port)))
}

/// The Service: NodePort, UDP, selecting the session's agent pod by its session label.
pub fn node_port_service(namespace: &str, session: &str) -> Service {
    let labels = BTreeMap::from([
        (names::LABEL_MANAGED_BY.to_owned(), names::MANAGED_BY_VALUE.to_owned()),
        (names::LABEL_SESSION.to_owned(), session.to_owned()),
    ]);
    let port = i32::from(names::AGENT_TRANSPORT_PORT);
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(session)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            selector: Some(BTreeMap::from([(names::LABEL_SESSION.to_owned(), session.to_owned())])),
            ports: Some(vec![ServicePort {
                name: Some("wireguard".into()),
                protocol: Some("UDP".into()),
                port,
                target_port: Some(IntOrString::Int(port)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The agent pod's node: its ExternalIP if it has one (reachable from
/// outside the cluster's network), else its InternalIP, else the pod's hostIP.
async fn node_address(cluster: &Cluster, agent_pod: &str) -> anyhow::Result<IpAddr> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let pod = pods.get(agent_pod).await.with_context(|| format!("cannot read pod/{agent_pod}"))?;
    let host_ip = pod.status.as_ref().and_then(|s| s.host_ip.as_deref()).and_then(|ip| ip.parse().ok());
    let from_node = match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        Some(node) => {
            let nodes: Api<Node> = Api::all(cluster.client.clone());
            match nodes.get(node).await {
                Ok(n) => pick_address(&n),
                Err(e) => {
                    debug!("cannot read node/{node}: {e}");
                    None
                }
            }
        }
        None => None,
    };
    from_node.or(host_ip).with_context(|| format!("the node of pod/{agent_pod} has no address"))
}

/// ExternalIP before InternalIP.
pub fn pick_address(node: &Node) -> Option<IpAddr> {
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref())?;
    ["ExternalIP", "InternalIP"]
        .iter()
        .find_map(|kind| addresses.iter().filter(|a| a.type_ == *kind).find_map(|a| a.address.parse().ok()))
}

async fn wait_for_endpoint(cluster: &Cluster, service: &str) -> anyhow::Result<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let selector = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let started = Instant::now();
    loop {
        let list =
            slices.list(&selector).await.with_context(|| format!("cannot read the endpoints of service/{service}"))?;
        let ready = list
            .items
            .iter()
            .flat_map(|s| &s.endpoints)
            .any(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false) && !e.addresses.is_empty());
        if ready {
            return Ok(());
        }
        if started.elapsed() > ENDPOINTS_TIMEOUT {
            anyhow::bail!("service/{service} did not select the agent pod within {} s", ENDPOINTS_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(addresses: &[(&str, &str)]) -> Node {
        let addresses =
            addresses.iter().map(|(t, a)| NodeAddress { type_: (*t).into(), address: (*a).into() }).collect();
        Node { status: Some(NodeStatus { addresses: Some(addresses), ..Default::default() }), ..Default::default() }
    }

    #[test]
    fn external_ip_wins_then_internal_ip() {
        let both = node(&[("Hostname", "n1"), ("InternalIP", "10.0.0.5"), ("ExternalIP", "203.0.113.7")]);
        assert_eq!(pick_address(&both), Some("203.0.113.7".parse().unwrap()));
        assert_eq!(pick_address(&node(&[("InternalIP", "10.0.0.5")])), Some("10.0.0.5".parse().unwrap()));
        assert_eq!(pick_address(&node(&[("Hostname", "n1")])), None);
    }

    #[test]
    fn the_service_selects_only_the_sessions_pod_over_udp() {
        let svc = node_port_service("dev", "abc123");
        let labels = svc.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get(names::LABEL_SESSION).map(String::as_str), Some("abc123"));
        assert_eq!(labels.get(names::LABEL_MANAGED_BY).map(String::as_str), Some(names::MANAGED_BY_VALUE));
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(spec.selector, Some(BTreeMap::from([(names::LABEL_SESSION.to_owned(), "abc123".to_owned())])));
        let port = &spec.ports.unwrap()[0];
        assert_eq!((port.protocol.as_deref(), port.port, port.node_port), (Some("UDP"), 7700, None));
    }

    #[test]
    fn a_sidecar_saying_stream_means_the_port_forward() {
        assert_eq!(Used::from(Carrier::Stream), Used::Portforward);
        assert_eq!(Used::from(Carrier::Udp), Used::Udp);
        assert_eq!(serde_json::to_string(&Used::Portforward).unwrap(), "\"portforward\"");
    }
}
