//! The stream transport's relay: the sidecar connects to a Unix socket in
//! the session directory, and each connection is carried over a fresh
//! port-forward to the transport port of the session's agent pod. When a
//! port-forward drops, the sidecar's connection ends and it dials again,
//! which opens a new port-forward: the session (and WireGuard) live on.
//!
//! The first connection goes to the agent pod the session just saw ready
//! (looking it up again would cost a round trip to the API server on the
//! way to the first request served). The agent pod is looked up again for
//! every later connection: when it is
//! deleted (a node drained, an eviction, `kubectl delete pod`), its
//! ReplicaSet starts another, and the next connection waits until that one
//! is ready and goes there. The sidecar then meets a new agent key in the
//! hello and starts a new WireGuard session. An intercept's tunnel goes to
//! its home pod, which the registrar picks and moves the same way.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tpd_wire::names;
use tracing::{debug, info};

use super::portforward;
use crate::cluster::Cluster;
use crate::intercept::register;
use crate::output::progress;

/// File name of the relay's socket in the session directory.
pub const SOCKET: &str = "transport.sock";

/// How often a connection waiting for a ready agent pod looks again.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Relay {
    /// The socket's path inside the sidecar.
    pub socket_in_sidecar: String,
}

/// Where the session's tunnel goes.
#[derive(Debug)]
pub enum Agents {
    /// The session's own agent pod (a swap's, or the outbound-only pod),
    /// `first` when the session started.
    Session { session: String, first: String },
    /// An intercept's home pod, as the registrar picks it.
    Home(watch::Receiver<Option<register::AgentPod>>),
}

/// Listens on `dir/transport.sock` and relays until `shutdown`.
pub fn start(dir: &Path, cluster: &Cluster, agents: Agents, shutdown: CancellationToken) -> anyhow::Result<Relay> {
    let path: PathBuf = dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("cannot listen on {}", path.display()))?;
    let (selector, current, home) = match agents {
        Agents::Session { session, first } => (format!("{}={session}", names::LABEL_SESSION), first, None),
        Agents::Home(home) => (String::new(), String::new(), Some(home)),
    };
    let first = (!current.is_empty()).then(|| current.clone());
    let agent = Arc::new(AgentPod {
        pods: Api::namespaced(cluster.client.clone(), &cluster.namespace),
        client: cluster.client.clone(),
        namespace: cluster.namespace.clone(),
        selector,
        current: Mutex::new(current),
        first: Mutex::new(first),
        home,
    });
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                () = shutdown.cancelled() => return,
            };
            match conn {
                Ok((stream, _)) => {
                    tokio::spawn(agent.clone().relay_one(stream, shutdown.clone()));
                }
                Err(e) => info!("relay accept failed: {e}"),
            }
        }
    });
    Ok(Relay { socket_in_sidecar: format!("{}/{SOCKET}", names::SESSION_DIR) })
}

/// The session's agent pod, as it is now.
struct AgentPod {
    pods: Api<Pod>,
    client: kube::Client,
    namespace: String,
    selector: String,
    /// The pod the last connection went to.
    current: Mutex<String>,
    /// The ready pod the session started with, until the first connection takes it.
    first: Mutex<Option<String>>,
    /// For an intercept: the home pod, which replaces the lookup by label.
    home: Option<watch::Receiver<Option<register::AgentPod>>>,
}

impl AgentPod {
    async fn relay_one(self: Arc<Self>, local: UnixStream, shutdown: CancellationToken) {
        let (pod, port) = tokio::select! {
            found = self.target() => found,
            () = shutdown.cancelled() => return,
        };
        let forward = match portforward::open(&self.client, &self.namespace, &pod, port).await {
            Ok(f) => f,
            Err(e) => {
                // The sidecar dials again with backoff; the next try may find another pod.
                info!("{e}");
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

    /// The pod and port the next connection goes to, waiting for one.
    async fn target(&self) -> (String, u16) {
        let Some(home) = &self.home else {
            let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
            let pod = match first {
                Some(pod) => pod,
                None => self.ready().await,
            };
            return (pod, names::AGENT_TRANSPORT_PORT);
        };
        // The registrar says when the home moves.
        let mut home = home.clone();
        match home.wait_for(Option::is_some).await.map(|h| h.clone()) {
            Ok(Some(h)) => (h.name, h.transport),
            // The registrar is gone: the session is ending.
            _ => std::future::pending().await,
        }
    }

    /// The name of a ready agent pod of the session, waiting until there is
    /// one; says once when it is not the pod the session used before.
    async fn ready(&self) -> String {
        let mut waiting = false;
        loop {
            match self.find_ready().await {
                Ok(Some(pod)) => {
                    self.note(&pod);
                    return pod;
                }
                Ok(None) if !waiting => {
                    waiting = true;
                    let gone = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    progress(&format!("the agent pod {gone} is not ready; waiting for it or its replacement"));
                }
                Ok(None) => {}
                Err(e) => debug!("cannot list the agent pods: {}", crate::cluster::describe(&e)),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn find_ready(&self) -> Result<Option<String>, kube::Error> {
        let list = self.pods.list(&ListParams::default().labels(&self.selector)).await?;
        Ok(list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && crate::rollout::is_ready(p))
            .find_map(|p| p.metadata.name.clone()))
    }

    fn note(&self, pod: &str) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *current != pod {
            progress(&format!("the agent pod {current} was replaced by {pod}; reconnecting"));
            *current = pod.to_owned();
        }
    }
}
