//! Undoing a session: the one cleanup that `tpd run` runs on every exit path
//! and that the guardian runs when `tpd run` itself died. Each step has its
//! own fresh deadline and runs even when an earlier one failed, so one
//! unreachable API does not leave the rest behind.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bollard::models::NetworkDisconnectRequest;
use bollard::query_parameters::{
    InspectNetworkOptions, ListContainersOptions, ListNetworksOptions, RemoveContainerOptions,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use tpd_wire::names;
use tracing::info;

use crate::intercept::{self, end::Ended};
use crate::output::progress;
use crate::swap::apply::{self, Restored};

/// How a cleanup went.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Every step succeeded.
    pub ok: bool,
    /// This session's swap was put back, or its intercept was the last and
    /// the Deployment is as before: it rolls back.
    pub restored: bool,
}

/// How long a step that talks to the API server may take: it must not hang
/// on an unreachable cluster.
const STEP_DEADLINE: Duration = Duration::from_secs(8);
/// How long the restore may take: an intercept's last session waits out, at
/// most a lease, the entries of sessions that stopped renewing before it
/// restores (`intercept::end::end`).
const RESTORE_DEADLINE: Duration = STEP_DEADLINE.saturating_add(tpd_wire::intercept::LEASE);
/// How long the local step may take: stopping the sidecar, removing the
/// containers and, after a killed sidecar, the volume release (up to 30 s
/// of its own) on a loaded Docker engine. With 8 s it ran out under
/// load and left a killed sidecar's FUSE mounts behind.
const LOCAL_STEP_DEADLINE: Duration = Duration::from_secs(45);

/// What a session may have created.
#[derive(Clone)]
pub struct Cleanup {
    pub client: kube::Client,
    pub namespace: String,
    pub session: String,
    /// The Deployment the session swapped or intercepted, if any.
    pub deployment: Option<String>,
}

impl std::fmt::Debug for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cleanup").field("session", &self.session).field("deployment", &self.deployment).finish()
    }
}

impl Cleanup {
    /// The cleanup of `session` on `cluster`, which swapped or intercepted `deployment` if any.
    pub fn new(cluster: &crate::cluster::Cluster, session: &str, deployment: Option<String>) -> Self {
        Cleanup {
            client: cluster.client.clone(),
            namespace: cluster.namespace.clone(),
            session: session.to_owned(),
            deployment,
        }
    }

    /// Restores the Deployment, deletes the session's pods and Services,
    /// removes its local containers and networks.
    pub async fn run(&self) -> Outcome {
        let restored = Arc::new(AtomicBool::new(false));
        let mut ok = true;
        if let Some(name) = &self.deployment {
            ok &= step("restore", RESTORE_DEADLINE, self.restore(name, &restored)).await;
        }
        ok &= step("delete the session's cluster objects", STEP_DEADLINE, self.delete_objects()).await;
        let local = remove_local(&self.session);
        ok &= step("remove the session's containers, networks and volume mounts", LOCAL_STEP_DEADLINE, local).await;
        // The session's directory holds the remote env (secrets) in status.json.
        let dir = crate::session::session_dir_path(&self.session);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", dir.display());
            ok = false;
        }
        Outcome { ok, restored: restored.load(Ordering::Relaxed) }
    }

    async fn restore(&self, name: &str, restored: &AtomicBool) -> anyhow::Result<()> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        if api.get_opt(name).await?.is_none() {
            return Ok(());
        }
        match apply::restore(&api, &self.namespace, name, Some(&self.session)).await? {
            Restored::Done { .. } => {
                progress(&format!("restored deployment/{name}"));
                restored.store(true, Ordering::Relaxed);
            }
            Restored::NotSwapped => self.end_intercept(name, restored).await?,
            // Restored or taken over by someone else.
            Restored::TakenOver { .. } => info!("deployment/{name} is not swapped by this session"),
        }
        Ok(())
    }

    /// Removes the session's intercept of deployment/`name`, and the
    /// intercept itself when it was the last.
    async fn end_intercept(&self, name: &str, restored: &AtomicBool) -> anyhow::Result<()> {
        match intercept::end::end(&self.client, &self.namespace, name, &self.session).await? {
            Ended::Restored => {
                progress(&format!("restored deployment/{name} (its last intercept ended)"));
                restored.store(true, Ordering::Relaxed);
            }
            Ended::Left => progress(&format!("ended this session's intercept of deployment/{name}")),
            // Never swapped or intercepted by this session (refused), or restored meanwhile.
            Ended::NotIntercepted => info!("deployment/{name} is neither swapped nor intercepted"),
        }
        Ok(())
    }

    async fn delete_objects(&self) -> anyhow::Result<()> {
        apply::delete_cluster_objects(&self.client, &self.namespace, &self.session).await
    }
}

/// Removes the session's containers, then its volume directory and any
/// FUSE mount a killed sidecar left there (see `mounts::release`).
async fn remove_local(session: &str) -> anyhow::Result<()> {
    let docker = crate::docker::connect().await?;
    let image = crate::mounts::stop_sidecar(&docker, session).await.unwrap_or_else(|e| {
        info!("could not stop the sidecar gracefully: {e:#}");
        None
    });
    // The volume release runs even when a removal failed: it checks for
    // itself that nothing of the session still runs.
    let containers = remove_containers(session).await;
    let networks = remove_networks(&docker, session).await;
    let image = image.unwrap_or_else(|| crate::config::Images::defaults().sidecar);
    let volumes = crate::mounts::release(&docker, session, &image, crate::session::sidecar::labels(session)).await;
    containers.and(networks).and(volumes)
}

/// Removes the Docker networks labelled with `session` (`tpd connect` makes
/// one for compose projects), first detaching what still uses them: the
/// containers of a project started from a generated file, which lost their
/// network namespace with the sidecar anyway.
async fn remove_networks(docker: &bollard::Docker, session: &str) -> anyhow::Result<()> {
    let filters = [("label".to_owned(), vec![format!("{}={session}", names::LABEL_SESSION)])].into_iter().collect();
    let networks = docker.list_networks(Some(ListNetworksOptions { filters: Some(filters) })).await?;
    for net in networks {
        let name = net.name.unwrap_or_default();
        let attached =
            docker.inspect_network(&name, None::<InspectNetworkOptions>).await?.containers.unwrap_or_default();
        for (id, c) in attached {
            progress(&format!(
                "detaching container {} from the session's network {name}",
                c.name.unwrap_or(id.clone())
            ));
            let _ =
                docker.disconnect_network(&name, NetworkDisconnectRequest { container: id, force: Some(true) }).await;
        }
        docker.remove_network(&name).await?;
        info!("removed network {name}");
    }
    Ok(())
}

/// How long the guardian keeps removing what appears after its cleanup.
const LATE_SWEEP: Duration = Duration::from_secs(5);

/// Removes containers and networks of `session` that show up after the
/// cleanup for a while. A `tpd run` killed mid-request leaves the Docker
/// engine finishing a create it asked for, and that container appears only
/// once the first sweep is done.
pub async fn sweep_late_arrivals(session: &str) {
    let Ok(docker) = crate::docker::connect().await else {
        return;
    };
    let deadline = tokio::time::Instant::now() + LATE_SWEEP;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for result in [remove_containers(session).await, remove_networks(&docker, session).await] {
            if let Err(e) = result {
                info!("late sweep: {e:#}");
            }
        }
    }
}

/// Removes every local container labelled with `session`.
pub async fn remove_containers(session: &str) -> anyhow::Result<()> {
    let docker = crate::docker::connect().await?;
    let filters = [("label".to_owned(), vec![format!("{}={session}", names::LABEL_SESSION)])].into_iter().collect();
    let list = docker
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
        .await?;
    for c in list {
        let id = c.id.unwrap_or_default();
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match docker.remove_container(&id, Some(options)).await {
            Ok(()) => info!("removed container {id}"),
            Err(e) if crate::docker::is_gone_or_going(&e) => info!("container {id} is already gone or going: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn step(what: &str, deadline: Duration, fut: impl Future<Output = anyhow::Result<()>>) -> bool {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            crate::output::warning(&format!("cleanup could not {what}: {e:#}"));
            false
        }
        Err(_) => {
            crate::output::warning(&format!("cleanup could not {what} within {} s", deadline.as_secs()));
            false
        }
    }
}
