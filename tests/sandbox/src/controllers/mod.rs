//! The controllers of kube-controller-manager that the sandbox needs, run
//! in-process against the registry: one loop, woken by store events (and a
//! periodic tick for time-based conditions), runs every controller's
//! level-triggered reconcile until nothing changes.

pub mod bootstrap;
mod deployment;
mod endpoints;
mod objects;
mod replicaset;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::api::registry::Registry;

const RESYNC: Duration = Duration::from_secs(1);

/// The resources whose changes can make a controller act.
const WATCHED: &[&str] = &["namespaces", "configmaps", "pods", "services", "deployments.apps", "replicasets.apps"];

fn reconcile_all(reg: &Registry, ca_pem: &str) {
    bootstrap::default_service_accounts(reg);
    bootstrap::root_ca_config_maps(reg, ca_pem);
    deployment::reconcile(reg);
    replicaset::reconcile(reg);
    endpoints::reconcile(reg);
}

/// Spawns the controller loop; it stops with `shutdown`.
pub fn spawn(reg: Arc<Registry>, ca_pem: String, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = match reg.store.subscribe(None) {
            Ok(sub) => sub.live,
            Err(e) => {
                tracing::error!(error = %e, "controllers could not subscribe to the store");
                return;
            }
        };
        let mut tick = tokio::time::interval(RESYNC);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                ev = events.recv() => match ev {
                    Ok(e) if !WATCHED.contains(&e.resource.as_str()) => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
            // Everything queued meanwhile is covered by this pass.
            while let Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) = events.try_recv() {}
            reconcile_all(&reg, &ca_pem);
        }
    })
}
