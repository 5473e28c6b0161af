//! The stream transport's relay: the sidecar connects to a Unix socket in
//! the session directory, and each connection is carried over a fresh
//! kube-rs port-forward to the agent pod's transport port. When a
//! port-forward drops, the sidecar's connection ends and it dials again,
//! which opens a new port-forward: the session (and WireGuard) live on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tpd_wire::names;
use tracing::{debug, info, warn};

use crate::cluster::Cluster;

/// File name of the relay's socket in the session directory.
pub const SOCKET: &str = "transport.sock";

#[derive(Debug)]
pub struct Relay {
    /// The socket's path inside the sidecar.
    pub socket_in_sidecar: String,
}

/// Listens on `dir/transport.sock` and relays until `shutdown`.
pub fn start(dir: &Path, cluster: &Cluster, agent_pod: &str, shutdown: CancellationToken) -> anyhow::Result<Relay> {
    let path: PathBuf = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let pod = agent_pod.to_owned();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                () = shutdown.cancelled() => return,
            };
            match conn {
                Ok((stream, _)) => {
                    tokio::spawn(relay_one(pods.clone(), pod.clone(), stream, shutdown.clone()));
                }
                Err(e) => warn!("relay accept failed: {e}"),
            }
        }
    });
    Ok(Relay { socket_in_sidecar: format!("{}/{SOCKET}", names::SESSION_DIR) })
}

async fn relay_one(pods: Api<Pod>, pod: String, mut local: UnixStream, shutdown: CancellationToken) {
    let port = names::AGENT_TRANSPORT_PORT;
    let mut forward = match pods.portforward(&pod, &[port]).await {
        Ok(f) => f,
        Err(e) => {
            warn!("cannot open a port-forward to pod/{pod}:{port}: {e}");
            return;
        }
    };
    let Some(mut remote) = forward.take_stream(port) else {
        warn!("the port-forward to pod/{pod} has no stream for port {port}");
        return;
    };
    info!("stream transport connected through a port-forward to pod/{pod}:{port}");
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut local, &mut remote) => match r {
            Ok((up, down)) => debug!(up, down, "port-forward closed"),
            Err(e) => info!("port-forward dropped: {e}; the sidecar reconnects"),
        },
        () = shutdown.cancelled() => {}
    }
    drop(remote);
    let _ = forward.join().await;
}
