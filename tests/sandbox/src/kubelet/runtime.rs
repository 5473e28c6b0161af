//! The node's Docker side: the instance's network, the pause image, the
//! labels that tie every container to its instance and pod, and teardown.

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{ContainerSummary, Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
};
use futures::StreamExt;

use crate::layout;

/// The pause image, built locally from the embedded static pause program.
pub const PAUSE_IMAGE: &str = "tpd-sandbox/pause:1";
const PAUSE_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pause"));

/// Labels on pod containers (besides [`layout::LABEL_INSTANCE`]).
pub const LABEL_POD_UID: &str = "dev.tpd.sandbox.pod-uid";
pub const LABEL_POD_NAMESPACE: &str = "dev.tpd.sandbox.pod-namespace";
pub const LABEL_POD_NAME: &str = "dev.tpd.sandbox.pod-name";
/// The pod's container name; the pause container is [`PAUSE_CONTAINER`].
pub const LABEL_CONTAINER: &str = "dev.tpd.sandbox.container";
/// How many times this container was restarted before this instance of it.
pub const LABEL_ATTEMPT: &str = "dev.tpd.sandbox.attempt";
pub const PAUSE_CONTAINER: &str = "POD";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot reach the Docker engine (is it running? `docker info` tells)")]
    Connect(#[source] bollard::errors::Error),
    #[error("docker {what}")]
    Docker {
        what: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("building the pause image: {0}")]
    PauseImage(String),
    #[error(
        "the sandbox's subnet {subnet} is taken{}; one instance runs per machine: stop it first (`tpd-sandbox down --name NAME`)",
        if holders.is_empty() { String::new() } else { format!(" by instance(s) {}", holders.join(", ")) }
    )]
    SubnetTaken {
        subnet: &'static str,
        holders: Vec<String>,
        #[source]
        source: bollard::errors::Error,
    },
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Wraps a bollard error with what was being done.
pub fn docker_err(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Docker { what, source }
}

/// The HTTP status of a Docker error, to classify 404/409 without strings.
pub fn status_of(err: &bollard::errors::Error) -> Option<u16> {
    match err {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub async fn connect() -> Result<Docker> {
    Docker::connect_with_defaults()
        .map_err(RuntimeError::Connect)?
        .negotiate_version()
        .await
        .map_err(RuntimeError::Connect)
}

/// The instance's Docker network name.
pub fn network_name(instance: &str) -> String {
    instance.to_owned()
}

/// Creates the instance's internal network if it does not exist yet and
/// returns the name of its bridge interface on the host.
pub async fn ensure_network(docker: &Docker, instance: &str) -> Result<String> {
    let name = network_name(instance);
    let id = match docker.inspect_network(&name, None).await {
        Ok(net) => net.id.unwrap_or_default(),
        Err(e) if status_of(&e) == Some(404) => {
            let req = NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                internal: Some(true),
                ipam: Some(Ipam {
                    config: Some(vec![IpamConfig {
                        subnet: Some(layout::NETWORK_SUBNET.into()),
                        ip_range: Some(layout::POD_CIDR.into()),
                        gateway: Some(layout::NETWORK_GATEWAY.to_string()),
                        // Docker would hand out the range's first address
                        // (10.100.0.0), which looks like a network address.
                        auxiliary_addresses: Some(HashMap::from([(
                            "range-base".to_owned(),
                            layout::POD_CIDR.split_once('/').map_or(layout::POD_CIDR, |(ip, _)| ip).to_owned(),
                        )])),
                    }]),
                    ..Default::default()
                }),
                labels: Some(instance_labels(instance)),
                ..Default::default()
            };
            match docker.create_network(req).await {
                Ok(created) => created.id,
                Err(e) if status_of(&e) == Some(403) => {
                    // The subnet is taken, most likely by another instance:
                    // the address plan allows one per machine.
                    let holders = other_instances(docker, instance).await;
                    return Err(RuntimeError::SubnetTaken { subnet: layout::NETWORK_SUBNET, holders, source: e });
                }
                Err(e) => return Err(docker_err(format!("creating network {name}"))(e)),
            }
        }
        Err(e) => return Err(docker_err(format!("inspecting network {name}"))(e)),
    };
    // Docker names a bridge network's interface after the first 12 hex
    // digits of the network id.
    Ok(format!("br-{}", &id[..12.min(id.len())]))
}

/// Names of the other sandbox instances that have a network.
async fn other_instances(docker: &Docker, instance: &str) -> Vec<String> {
    let filters = HashMap::from([("label".to_owned(), vec![layout::LABEL_INSTANCE.to_owned()])]);
    let nets = docker
        .list_networks(Some(ListNetworksOptionsBuilder::default().filters(&filters).build()))
        .await
        .unwrap_or_default();
    nets.into_iter()
        .filter_map(|n| n.labels?.get(layout::LABEL_INSTANCE).cloned())
        .filter(|holder| holder != instance)
        .collect()
}

pub fn instance_labels(instance: &str) -> HashMap<String, String> {
    HashMap::from([(layout::LABEL_INSTANCE.to_owned(), instance.to_owned())])
}

/// Builds the pause image from the embedded binary unless it exists.
pub async fn ensure_pause_image(docker: &Docker) -> Result<()> {
    match docker.inspect_image(PAUSE_IMAGE).await {
        Ok(_) => return Ok(()),
        Err(e) if status_of(&e) == Some(404) => {}
        Err(e) => return Err(docker_err("inspecting the pause image")(e)),
    }
    let context = pause_build_context().map_err(|e| RuntimeError::PauseImage(e.to_string()))?;
    let opts = BuildImageOptionsBuilder::default()
        .t(PAUSE_IMAGE)
        .rm(true)
        .labels(&HashMap::from([(layout::LABEL_INSTANCE.to_owned(), "pause".to_owned())]))
        .build();
    let mut progress = docker.build_image(opts, None, Some(bollard::body_full(context.into())));
    while let Some(step) = progress.next().await {
        step.map_err(|e| RuntimeError::PauseImage(e.to_string()))?;
    }
    Ok(())
}

fn pause_build_context() -> std::io::Result<Vec<u8>> {
    let dockerfile = b"FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n";
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data, mode) in [("Dockerfile", &dockerfile[..], 0o644), ("pause", PAUSE_BINARY, 0o755)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, path, data)?;
    }
    tar.into_inner()
}

/// Every container of the instance, running or not, optionally narrowed by
/// more `label=value` filters.
pub async fn list_containers(
    docker: &Docker,
    instance: &str,
    labels: &[(&str, &str)],
) -> Result<Vec<ContainerSummary>> {
    let mut label_filters = vec![format!("{}={instance}", layout::LABEL_INSTANCE)];
    label_filters.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
    let filters = HashMap::from([("label".to_owned(), label_filters)]);
    let opts = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
    docker.list_containers(Some(opts)).await.map_err(docker_err("listing containers"))
}

/// Force-removes every container labelled for `instance`.
async fn remove_containers(docker: &Docker, instance: &str) -> Result<()> {
    for c in list_containers(docker, instance, &[]).await? {
        if let Some(id) = c.id {
            remove_container(docker, &id).await?;
        }
    }
    Ok(())
}

/// Force-removes a container; a container already gone is fine.
pub async fn remove_container(docker: &Docker, id: &str) -> Result<()> {
    let opts = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(e) if status_of(&e) == Some(404) => Ok(()),
        Err(e) => Err(docker_err(format!("removing container {id}"))(e)),
    }
}

/// How long teardown waits before it looks for containers a second time.
/// A create the stopped server had sent can still finish in dockerd after
/// the first listing: once, a pod container in state Created, made in a
/// CI run's last second, outlived the sandbox.
const LATE_CREATE_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Removes every container, network and volume labelled for `instance`.
pub async fn teardown(docker: &Docker, instance: &str) -> Result<()> {
    remove_containers(docker, instance).await?;
    tokio::time::sleep(LATE_CREATE_SETTLE).await;
    remove_containers(docker, instance).await?;
    let label = HashMap::from([("label".to_owned(), vec![format!("{}={instance}", layout::LABEL_INSTANCE)])]);
    let nets = docker
        .list_networks(Some(ListNetworksOptionsBuilder::default().filters(&label).build()))
        .await
        .map_err(docker_err("listing networks"))?;
    for net in nets {
        if let Some(id) = net.id {
            match docker.remove_network(&id).await {
                Ok(()) => {}
                Err(e) if status_of(&e) == Some(404) => {}
                Err(e) => return Err(docker_err(format!("removing network {id}"))(e)),
            }
        }
    }
    let vols = docker
        .list_volumes(Some(ListVolumesOptionsBuilder::default().filters(&label).build()))
        .await
        .map_err(docker_err("listing volumes"))?;
    for vol in vols.volumes.unwrap_or_default() {
        let opts = RemoveVolumeOptionsBuilder::default().force(true).build();
        match docker.remove_volume(&vol.name, Some(opts)).await {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(docker_err(format!("removing volume {}", vol.name))(e)),
        }
    }
    Ok(())
}
