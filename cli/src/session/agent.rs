//! The cluster half of a session, for `tpd run` and held sessions alike:
//! the swap or the intercept with its lease renewal, or the outbound-only
//! agent pod, up to the agent pod being ready.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::spec::Spec;
use crate::cluster::Cluster;
use crate::config::Images;
use crate::intercept::{self, apply::Intercept};
use crate::output::progress;
use crate::swap::lease::Leased;
use crate::swap::plan::{self, Params};
use crate::swap::{apply, lease};

/// The cluster half of a session once its agent is ready.
#[derive(Debug)]
pub struct Agent {
    /// The agent pod the session's tunnel reaches: the swapped Deployment's,
    /// the outbound-only one, or for an intercept one of the workload's pods
    /// (its "home" agent).
    pub pod: String,
    pub swap: Option<plan::Swap>,
    pub intercept: Option<Intercept>,
}

/// The cluster half of a session (also `tpd connect`'s): the swap or the
/// intercept, whose lease is renewed until `shutdown`, or the outbound-only
/// agent pod; returns once the agent pod is ready. `checked` is what the
/// target check read.
pub async fn start(
    cluster: &Cluster,
    spec: &Spec,
    images: &Images,
    id: &str,
    checked: super::Checked,
    shutdown: &CancellationToken,
) -> anyhow::Result<Agent> {
    let params = Params {
        agent_image: images.agent.clone(),
        session: id.to_owned(),
        holder: super::holder(),
        now: k8s_openapi::jiff::Timestamp::now(),
        lease_seconds: lease::LEASE_SECONDS,
        extra_ports: spec.session.ports.iter().map(|p| p.remote).collect(),
    };
    let timeout = Duration::from_secs(spec.session.ready_timeout);
    if let (None, Some(i)) = (&spec.swap, &spec.intercept) {
        let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        let remotes: Vec<u16> = spec.session.ports.iter().map(|p| p.remote).collect();
        let request = intercept::apply::Request {
            target: &i.target,
            filter: &i.filter,
            mirror: i.mirror,
            remotes: &remotes,
            agent_image: &images.agent,
            session: id,
            holder: &params.holder,
        };
        progress(&format!("intercepting {} in namespace {}: {}", i.target, cluster.namespace, i.describe()));
        let interrupted = || anyhow::anyhow!("interrupted before the intercept agents were ready");
        let added = tokio::select! {
            added = intercept::apply::add(cluster, &request) => added?,
            () = shutdown.cancelled() => return Err(interrupted()),
        };
        // Renewed from now on: a rollout may take longer than the lease.
        let what = format!("the intercept of {}", i.target);
        tokio::spawn(renew_lease(api, i.target.name.clone(), added.renewing(), what, shutdown.clone()));
        let (intercept, pod) = tokio::select! {
            ready = intercept::apply::ready(cluster, &i.target, added, timeout) => ready?,
            () = shutdown.cancelled() => return Err(interrupted()),
        };
        progress(&format!("intercept agents are ready beside container {} in every pod", intercept.container));
        return Ok(Agent { pod, swap: None, intercept: Some(intercept) });
    }
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let mut swapped = None;
    let swap = match &spec.swap {
        Some(target) => {
            let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
            progress(&format!("swapping {target} in namespace {} for tpd's agent", cluster.namespace));
            let swap = apply::swap(&api, &cluster.namespace, target, &params, spec.session.force, checked).await?;
            let what = format!("the swap of {target}");
            tokio::spawn(renew_lease(api.clone(), target.name.clone(), swap.record.clone(), what, shutdown.clone()));
            swapped = Some((api, target.name.clone()));
            Some(swap)
        }
        None => {
            let pod = super::outbound_agent_pod(&cluster.namespace, &params);
            progress("starting an outbound-only agent pod");
            pods.create(&PostParams::default(), &pod)
                .await
                .map_err(|e| anyhow::anyhow!(e).context("cannot create the agent pod"))?;
            None
        }
    };
    let agent = tokio::select! {
        pod = apply::wait_for_agent(&pods, swapped.as_ref().map(|(api, name)| (api, name.as_str())), id, &images.agent, timeout) => pod?,
        () = shutdown.cancelled() => anyhow::bail!("interrupted before the agent was ready"),
    };
    let agent_name = agent.metadata.name.clone().unwrap_or_default();
    progress(&format!("agent pod {agent_name} is ready"));
    Ok(Agent { pod: agent_name, swap, intercept: None })
}

/// Renews the lease of `record` (the swap's, or the session's intercept
/// entry; `what` names it) until shutdown. An API server that does not
/// answer is asked again (the record may still be ours when it comes back,
/// even past the lease: nobody repaired it meanwhile); a record that is no
/// longer ours (restored or taken over) ends the session.
async fn renew_lease<L: Leased>(
    api: Api<Deployment>,
    name: String,
    mut record: L,
    what: String,
    shutdown: CancellationToken,
) {
    let mut wait = record.renew_every();
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        match apply::renew(&api, &name, &record).await {
            Ok(renewed) => {
                record = renewed;
                wait = record.renew_every();
            }
            Err(apply::RenewError::Unreachable(why)) => {
                info!("{why}; trying again");
                wait = lease::RETRY_EVERY;
            }
            Err(apply::RenewError::Lost(why)) => {
                progress(&format!("lost {what}: {why}; ending the session"));
                shutdown.cancel();
                return;
            }
        }
    }
}
