//! A held session: what `tpd connect --hold` and `tpd compose` keep up
//! while they run. It is `tpd run`'s session without the developer's
//! container: the guardian, the swap or outbound agent pod with its lease
//! renewal ([`super::agent`]), the relay and the sidecar ([`super::start`]),
//! plus a Docker network for compose projects. [`establish`] undoes
//! everything it started when it fails; [`Held::end`] runs the same
//! `Cleanup` as every other exit path.

use std::time::Duration;

use anyhow::Context as _;
use bollard::Docker;
use bollard::models::{NetworkConnectRequest, NetworkCreateRequest};
use bollard::query_parameters::InspectContainerOptions;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::named::{MountRecord, Record, SwapRecord};
use super::spec::Spec;
use crate::checks;
use crate::cleanup::Cleanup;
use crate::cli::{GlobalArgs, Publish};
use crate::cluster::Cluster;
use crate::config::Images;
use crate::guardian::Guardian;
use crate::intercept::register::Registrar;
use crate::output::progress;
use crate::swap::apply;

/// A session that is up: the record compose reads, and what ends it.
#[derive(Debug)]
pub struct Held {
    pub record: Record,
    cleanup: Cleanup,
    guardian: Guardian,
    cluster: Cluster,
    /// Cancels the relay and the lease renewal.
    tasks: CancellationToken,
    /// An intercept's registrations, ended before the cleanup.
    registrar: Option<Registrar>,
}

/// Starts a session named `name` and returns once its sidecar is ready.
/// On failure (or `shutdown` before it is ready) everything it created is
/// removed before the error is returned.
pub async fn establish(
    global: &GlobalArgs,
    cluster: &Cluster,
    images: &Images,
    name: &str,
    spec: &Spec,
    shutdown: &CancellationToken,
) -> anyhow::Result<Held> {
    let docker = crate::docker::connect().await?;
    checks::image_present(&docker, &images.sidecar, checks::TPD_IMAGE_FIX).await?;
    checks::ports_free(spec.session.publish.iter().map(|p| p.host))?;
    // Unknown Deployment, ambiguous container, undeclared port: fail before the guardian exists.
    let checked = super::check_target(cluster, spec).await?;
    let id = super::new_id();
    info!(session = %id, name, "connect session starting");
    let deployment = spec.deployment().map(|t| t.name.clone());
    let guardian = Guardian::spawn(global, cluster, &id, deployment.as_deref()).await?;
    let cleanup = Cleanup::new(cluster, &id, deployment);
    let tasks = shutdown.child_token();
    let network = format!("tpd-{id}");
    match start(&docker, cluster, images, name, &id, &network, spec, checked, &tasks).await {
        Ok((record, registrar)) => Ok(Held { record, cleanup, guardian, cluster: cluster.clone(), tasks, registrar }),
        Err(e) => {
            progress("removing what the session had started");
            tasks.cancel();
            if cleanup.run().await.ok {
                guardian.dismiss();
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start(
    docker: &Docker,
    cluster: &Cluster,
    images: &Images,
    name: &str,
    id: &str,
    network: &str,
    spec: &Spec,
    checked: super::Checked,
    tasks: &CancellationToken,
) -> anyhow::Result<(Record, Option<Registrar>)> {
    let (agent, routes) =
        tokio::join!(super::agent::start(cluster, spec, images, id, checked, tasks), super::ranges(cluster, spec));
    let (agent, routes) = (agent?, routes?);
    let request = NetworkCreateRequest {
        name: network.to_owned(),
        labels: Some(super::sidecar::labels(id)),
        ..Default::default()
    };
    docker
        .create_network(request)
        .await
        .with_context(|| format!("cannot create the session's Docker network {network}"))?;
    let ctx = super::Context {
        cluster,
        spec,
        images,
        id,
        agent_pod: agent.pod.clone(),
        swap: agent.swap.as_ref(),
        intercept: agent.intercept.as_ref(),
        routes,
    };
    let mut started = super::start(&ctx, tasks).await?;
    let registrar = started.registrar.take();
    tokio::spawn(end_when_the_sidecar_stops(
        docker.clone(),
        started.sidecar.id.clone(),
        started.sidecar.name.clone(),
        tasks.clone(),
    ));
    let record = record_of(docker, cluster, name, id, network, spec, &agent, started).await;
    match record {
        Ok(record) => Ok((record, registrar)),
        Err(e) => {
            if let Some(registrar) = registrar {
                registrar.end().await;
            }
            Err(e)
        }
    }
}

/// The held session's record, once its sidecar is ready.
#[allow(clippy::too_many_arguments)]
async fn record_of(
    docker: &Docker,
    cluster: &Cluster,
    name: &str,
    id: &str,
    network: &str,
    spec: &Spec,
    agent: &super::agent::Agent,
    started: super::Started,
) -> anyhow::Result<Record> {
    let connect = NetworkConnectRequest { container: started.sidecar.id.clone(), ..Default::default() };
    docker
        .connect_network(network, connect)
        .await
        .with_context(|| format!("cannot attach the sidecar to the network {network}"))?;
    let inspect = docker.inspect_container(&started.sidecar.id, None::<InspectContainerOptions>).await?;
    let sidecar = inspect.name.unwrap_or_default().trim_start_matches('/').to_owned();

    let mut env = super::env::merge(started.status.env, &[], &[])?;
    let mut mounts = Vec::new();
    if let Some(v) = &started.sidecar.volumes {
        env.insert(v.env.0.clone(), v.env.1.clone());
        mounts = v
            .app
            .iter()
            .map(|m| MountRecord {
                source: m.source.clone().unwrap_or_default(),
                target: m.target.clone().unwrap_or_default(),
                read_only: m.read_only.unwrap_or(false),
            })
            .collect();
    }
    let local = |remote: &u16| spec.session.ports.iter().find(|p| p.remote == *remote).map_or(*remote, |p| p.local);
    let swaps = match (&spec.swap, &agent.swap, &agent.intercept) {
        (Some(target), Some(swap), _) => vec![SwapRecord {
            deployment: target.to_string(),
            env: env.into_iter().collect(),
            mounts,
            local_ports: swap.ports.iter().map(local).collect(),
            intercept: None,
        }],
        (_, _, Some(i)) => vec![SwapRecord {
            deployment: i.target.to_string(),
            env: env.into_iter().collect(),
            mounts,
            local_ports: i.routes.iter().map(|r| local(&r.port)).collect(),
            intercept: spec.intercept.as_ref().map(|s| s.describe()),
        }],
        _ => Vec::new(),
    };
    Ok(Record {
        name: name.to_owned(),
        id: id.to_owned(),
        context: cluster.context.clone(),
        namespace: cluster.namespace.clone(),
        sidecar,
        network: network.to_owned(),
        pid: std::process::id(),
        published: spec.session.publish.iter().map(Publish::to_string).collect(),
        swaps,
    })
}

impl Held {
    /// Cancelled when the session ends by itself (its swap's lease was lost:
    /// restored by hand or taken over).
    pub fn lost(&self) -> CancellationToken {
        self.tasks.clone()
    }

    /// Ends the session: stops the relay and the lease renewal, restores the
    /// swap (or ends the intercept), deletes the agent pod, removes the
    /// sidecar and the network.
    pub async fn end(self) -> bool {
        if let Some(registrar) = self.registrar {
            registrar.end().await;
        }
        self.tasks.cancel();
        let outcome = self.cleanup.run().await;
        if outcome.ok {
            self.guardian.dismiss();
        }
        if let (Some(name), true) = (&self.cleanup.deployment, outcome.restored) {
            let api: Api<Deployment> = Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
            progress(&format!("waiting for deployment/{name} to roll back"));
            if let Err(e) = apply::wait_for_rollout(&api, name, Duration::from_secs(60)).await {
                warn!("{e:#}");
            }
        }
        outcome.ok
    }
}

/// Ends the held session (through its tasks' token, as a lost lease does)
/// when the sidecar stops: nothing joined to it reaches the cluster any more.
async fn end_when_the_sidecar_stops(docker: Docker, id: String, name: String, tasks: CancellationToken) {
    tokio::select! {
        why = super::sidecar::stopped(&docker, &id, &name) => {
            tracing::warn!("{why}; ending the session");
            tasks.cancel();
        }
        () = tasks.cancelled() => {}
    }
}
