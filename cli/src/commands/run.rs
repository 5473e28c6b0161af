//! `tpd run`: check everything local first, start the guardian, swap the
//! Deployment (or start an outbound-only agent pod), keep the lease, run the
//! session, and clean up the same way on every exit path: one
//! CancellationToken is cancelled by the command ending, Ctrl-C, the
//! developer's container exiting or the lease being lost.

use std::process::ExitCode;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cleanup::Cleanup;
use crate::cli::{GlobalArgs, RunArgs};
use crate::cluster::Cluster;
use crate::config::{self, Images};
use crate::guardian::Guardian;
use crate::output::progress;
use crate::session::spec::Spec;
use crate::swap::apply;
use crate::{checks, session};

pub async fn run(global: &GlobalArgs, args: RunArgs) -> anyhow::Result<ExitCode> {
    // Flags that do not fit together, before anything else.
    let spec = Spec::from_run(&args)?;
    let images = Images::resolve(global, &config::load()?);
    // Everything that can be checked without changing anything, first.
    let docker = crate::docker::connect().await?;
    checks::image_present(&docker, &args.image, "build it (`docker build -t IMAGE .`) or pull it first").await?;
    checks::image_present(&docker, &images.sidecar, checks::TPD_IMAGE_FIX).await?;
    checks::ports_free(args.session.publish.iter().map(|p| p.host))?;
    // The env files and -e flags are read again once the remote env is known.
    session::env::merge(Default::default(), &args.env, &args.env_file)?;
    // Unknown Deployment, ambiguous container, undeclared port: fail before the guardian exists.
    let (cluster, checked) = session::cluster_with_target(global, &spec).await?;
    let id = session::new_id();
    let log = crate::logging::to_file(&id)?;
    info!(session = %id, log = %log.display(), "session starting");
    let deployment = spec.deployment().map(|t| t.name.clone());
    let guardian = Guardian::spawn(global, &cluster, &id, deployment.as_deref()).await?;
    let cleanup = Cleanup::new(&cluster, &id, deployment);

    let shutdown = CancellationToken::new();
    tokio::spawn(ctrl_c(shutdown.clone()));
    let result = session_body(&cluster, &spec, &args, &images, &id, checked, &shutdown).await;
    shutdown.cancel();
    let outcome = cleanup.run().await;
    if outcome.ok {
        guardian.dismiss();
    }
    if let (Some(target), true) = (spec.deployment(), outcome.restored) {
        let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
        progress(&format!("waiting for {target} to roll back"));
        if let Err(e) = apply::wait_for_rollout(&api, &target.name, Duration::from_secs(60)).await {
            warn!("{e:#}");
        }
    }
    let code = result?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// Swap, intercept or agent pod, lease renewal, readiness, then the local
/// containers. Returns the developer container's exit code.
async fn session_body(
    cluster: &Cluster,
    spec: &Spec,
    args: &RunArgs,
    images: &Images,
    id: &str,
    checked: session::Checked,
    shutdown: &CancellationToken,
) -> anyhow::Result<i64> {
    let (agent, routes) = tokio::join!(
        session::agent::start(cluster, spec, images, id, checked, shutdown),
        session::ranges(cluster, spec)
    );
    let (agent, routes) = (agent?, routes?);
    let ctx = session::Context {
        cluster,
        spec,
        images,
        id,
        agent_pod: agent.pod,
        swap: agent.swap.as_ref(),
        intercept: agent.intercept.as_ref(),
        routes,
    };
    session::run(ctx, args, shutdown).await
}

/// First Ctrl-C: graceful shutdown. Second: exit now and leave the cleanup
/// to the guardian, which sees the pipe close without `done`.
async fn ctrl_c(shutdown: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!("tpd: restoring the cluster and removing the session's containers (press Ctrl-C again to force)");
    shutdown.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        eprintln!("tpd: forced exit; tpd's guardian restores the cluster in the background");
        std::process::exit(130);
    }
}
