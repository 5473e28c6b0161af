//! The sandbox's node: runs pods as Docker containers and serves the pod
//! subresources that stream (see [`crate::node`]).
//!
//! It talks to the API server like a real kubelet, with kube-rs: it
//! registers the Node object, watches the pods bound to it and writes their
//! status. Service proxying and cluster DNS live in [`crate::network`].

mod env;
mod netns;
mod node_object;
mod pods;
mod probe;
mod runtime;
mod spec;
mod streams;
mod volumes;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

/// What the node needs to know about the sandbox instance it belongs to.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Instance name (see `layout::DEFAULT_NAME`); prefixes every Docker object.
    pub instance: String,
    /// Directory for the instance's host-side state (volumes, logs).
    pub state_dir: PathBuf,
}

/// Creates the instance's Docker network, registers the Node object, and
/// spawns the pod and service reconcilers; they stop when `shutdown` fires.
pub async fn start(
    cfg: NodeConfig,
    client: kube::Client,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<dyn crate::node::Node>> {
    let docker = runtime::connect().await?;
    runtime::ensure_pause_image(&docker).await?;
    let bridge = runtime::ensure_network(&docker, &cfg.instance).await?;
    tracing::debug!(%bridge, "instance network ready");
    crate::network::start(client.clone(), bridge, shutdown.clone())
        .await
        .context("starting service proxies and cluster DNS")?;
    let node_ip = node_object::host_address(&docker).await;
    node_object::register(&client, node_ip).await.context("registering the Node object")?;
    tokio::spawn(node_object::heartbeat(client.clone(), shutdown.clone()));
    let kubelet = Arc::new(pods::Kubelet {
        docker: docker.clone(),
        client: client.clone(),
        instance: cfg.instance.clone(),
        state_dir: cfg.state_dir.clone(),
        host_ip: node_ip.to_string(),
    });
    tokio::spawn(pods::run(kubelet, shutdown.clone()));
    Ok(Arc::new(streams::DockerNode { docker, instance: cfg.instance }))
}

/// Removes every Docker object labelled for `instance`, even if the server
/// that made them is gone. The service addresses go with the bridge.
pub async fn teardown(instance: &str) -> anyhow::Result<()> {
    let docker = runtime::connect().await?;
    runtime::teardown(&docker, instance).await?;
    Ok(())
}
