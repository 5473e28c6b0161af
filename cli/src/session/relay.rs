//! The stream transport's relay: the sidecar connects to a Unix socket in
//! the session directory, and each connection is carried over a fresh
//! port-forward to the agent pod's transport port. When a
//! port-forward drops, the sidecar's connection ends and it dials again,
//! which opens a new port-forward: the session (and WireGuard) live on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tpd_wire::names;
use tracing::{debug, info, warn};

use super::portforward;
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
    let (client, namespace, pod) = (cluster.client.clone(), cluster.namespace.clone(), agent_pod.to_owned());
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                () = shutdown.cancelled() => return,
            };
            match conn {
                Ok((stream, _)) => {
                    tokio::spawn(relay_one(client.clone(), namespace.clone(), pod.clone(), stream, shutdown.clone()));
                }
                Err(e) => warn!("relay accept failed: {e}"),
            }
        }
    });
    Ok(Relay { socket_in_sidecar: format!("{}/{SOCKET}", names::SESSION_DIR) })
}

async fn relay_one(
    client: kube::Client,
    namespace: String,
    pod: String,
    local: UnixStream,
    shutdown: CancellationToken,
) {
    let port = names::AGENT_TRANSPORT_PORT;
    let forward = match portforward::open(&client, &namespace, &pod, port).await {
        Ok(f) => f,
        Err(e) => {
            warn!("{e}");
            return;
        }
    };
    info!("stream transport connected through a port-forward to pod/{pod}:{port}");
    tokio::select! {
        r = forward.relay(local) => match r {
            Ok(carried) => debug!(up = carried.up, down = carried.down, "port-forward closed"),
            Err(e) => info!("port-forward dropped: {e}; the sidecar reconnects"),
        },
        () = shutdown.cancelled() => {}
    }
}
