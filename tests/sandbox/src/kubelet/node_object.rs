//! The Node object: registered at start, its Ready condition renewed as a
//! kubelet's heartbeat would.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use bollard::Docker;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;

use super::runtime::{RuntimeError, docker_err};
use crate::layout;

const HEARTBEAT: Duration = Duration::from_secs(20);

/// The host's address on Docker's default bridge (docker0): where NodePorts
/// are reachable from the host and from other local containers. Docker
/// leaves the gateway out of that network's IPAM config when it chose it
/// itself: it is then the subnet's first address. An engine run without a
/// default bridge (`--bridge=none`) gets the instance network's gateway,
/// which the host and the pods still reach.
pub async fn host_address(docker: &Docker) -> Ipv4Addr {
    match default_bridge_address(docker).await {
        Ok(Some(ip)) => ip,
        Ok(None) => layout::NETWORK_GATEWAY,
        Err(e) => {
            tracing::warn!(error = %e, "no default bridge; NodePorts are served on the instance network's gateway");
            layout::NETWORK_GATEWAY
        }
    }
}

async fn default_bridge_address(docker: &Docker) -> Result<Option<Ipv4Addr>, RuntimeError> {
    let net =
        docker.inspect_network("bridge", None).await.map_err(docker_err("inspecting the default bridge network"))?;
    let configs = net.ipam.and_then(|ipam| ipam.config).unwrap_or_default();
    let from_gateway = configs.iter().filter_map(|c| c.gateway.as_deref()).find_map(|g| g.parse().ok());
    let from_subnet = || {
        configs.iter().filter_map(|c| c.subnet.as_deref()).find_map(|s| {
            let base: Ipv4Addr = s.split_once('/')?.0.parse().ok()?;
            Some(Ipv4Addr::from(u32::from(base) + 1))
        })
    };
    Ok(from_gateway.or_else(from_subnet))
}

fn node_status(ip: Ipv4Addr) -> NodeStatus {
    let now = Time(Timestamp::now());
    let capacity: BTreeMap<String, Quantity> = [
        ("cpu", std::thread::available_parallelism().map_or(2, usize::from).to_string()),
        ("memory", "16Gi".to_owned()),
        ("pods", "110".to_owned()),
        ("ephemeral-storage", "100Gi".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Quantity(v)))
    .collect();
    NodeStatus {
        addresses: Some(vec![
            NodeAddress { type_: "InternalIP".into(), address: ip.to_string() },
            NodeAddress { type_: "Hostname".into(), address: layout::NODE_NAME.into() },
        ]),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("KubeletReady".into()),
            message: Some("kubelet is posting ready status".into()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(now),
        }]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            os_image: "tpd sandbox".into(),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            container_runtime_version: "docker://20.10".into(),
            kubelet_version: "v1.32.0-sandbox".into(),
            kube_proxy_version: "v1.32.0-sandbox".into(),
            machine_id: String::new(),
            system_uuid: String::new(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates (or takes over) the Node object and writes its status.
pub async fn register(client: &kube::Client, ip: Ipv4Addr) -> kube::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(layout::NODE_NAME.into()),
            labels: Some(
                [
                    ("kubernetes.io/hostname", layout::NODE_NAME),
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", "amd64"),
                    ("node-role.kubernetes.io/control-plane", ""),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(layout::POD_CIDR.into()),
            pod_cidrs: Some(vec![layout::POD_CIDR.into()]),
            ..Default::default()
        }),
        status: None,
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let patch = serde_json::json!({ "status": node_status(ip) });
    api.patch_status(layout::NODE_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Renews the Ready condition's heartbeat until shutdown.
pub async fn heartbeat(client: kube::Client, shutdown: CancellationToken) {
    let api: Api<Node> = Api::all(client);
    let started = Time(Timestamp::now());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
        // A merge patch replaces the whole list: send the one condition.
        let patch = serde_json::json!({ "status": { "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": Time(Timestamp::now()),
            "lastTransitionTime": started,
        }]}});
        if let Err(e) = api.patch_status(layout::NODE_NAME, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(error = %e, "node heartbeat");
        }
    }
}
