//! The cluster half of a session, for `tpd run` and held sessions alike:
//! the swap with its lease renewal, or the outbound-only agent pod, up to
//! the agent pod being ready.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::spec::Spec;
use crate::cluster::Cluster;
use crate::config::Images;
use crate::output::progress;
use crate::swap::plan::{self, Params};
use crate::swap::{apply, lease};

/// The cluster half of a session (also `tpd connect`'s): the swap, whose
/// lease is renewed until `shutdown`, or the outbound-only agent pod; returns
/// once the agent pod is ready, with the swap and the pod's name.
pub async fn start(
    cluster: &Cluster,
    spec: &Spec,
    images: &Images,
    id: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Option<plan::Swap>, String)> {
    let params = Params {
        agent_image: images.agent.clone(),
        session: id.to_owned(),
        holder: super::holder(),
        now: k8s_openapi::jiff::Timestamp::now(),
        lease_seconds: lease::LEASE_SECONDS,
        extra_ports: spec.session.ports.iter().map(|p| p.remote).collect(),
    };
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let mut swapped = None;
    let swap = match &spec.swap {
        Some(target) => {
            let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
            progress(&format!("swapping {target} in namespace {} for tpd's agent", cluster.namespace));
            let swap = apply::swap(&api, &cluster.namespace, target, &params, spec.session.force).await?;
            tokio::spawn(renew_lease(api.clone(), target.name.clone(), swap.record.clone(), shutdown.clone()));
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
    let timeout = Duration::from_secs(spec.session.ready_timeout);
    let agent = tokio::select! {
        pod = apply::wait_for_agent(&pods, swapped.as_ref().map(|(api, name)| (api, name.as_str())), id, &images.agent, timeout) => pod?,
        () = shutdown.cancelled() => anyhow::bail!("interrupted before the agent was ready"),
    };
    let agent_name = agent.metadata.name.clone().unwrap_or_default();
    progress(&format!("agent pod {agent_name} is ready"));
    Ok((swap, agent_name))
}

/// Renews the lease until shutdown. An API server that does not answer is
/// asked again (the record may still be ours when it comes back, even past
/// the lease: nobody repaired it meanwhile); a record that is no longer ours
/// (restored or taken over) ends the session.
async fn renew_lease(
    api: Api<Deployment>,
    name: String,
    mut record: crate::swap::record::Record,
    shutdown: CancellationToken,
) {
    let mut wait = lease::RENEW_EVERY;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        match apply::renew(&api, &name, &record).await {
            Ok(renewed) => {
                record = renewed;
                wait = lease::RENEW_EVERY;
            }
            Err(apply::RenewError::Unreachable(why)) => {
                info!("{why}; trying again");
                wait = lease::RETRY_EVERY;
            }
            Err(apply::RenewError::Lost(why)) => {
                progress(&format!("lost the swap of deployment/{name}: {why}; ending the session"));
                shutdown.cancel();
                return;
            }
        }
    }
}
