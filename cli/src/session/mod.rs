//! The local half of a session: the cluster's address ranges, the relay of
//! the stream transport, the sidecar container and the developer's
//! container. `tpd run` calls [`run`] once the agent pod is ready.

pub mod agent;
pub mod cidrs;
pub mod container;
pub mod env;
pub mod held;
pub mod named;
pub mod naming;
pub mod portforward;
pub mod relay;
pub mod sidecar;
pub mod spec;
pub mod transport;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, SecurityContext};
use kube::api::ObjectMeta;
use tokio_util::sync::CancellationToken;
use tpd_wire::names;
use tpd_wire::sidecar::{Carrier, Cidr, Status};

use crate::cli::{GlobalArgs, RunArgs};
use crate::cluster::Cluster;
use crate::config::Images;
use crate::intercept::apply::Intercept;
use crate::intercept::register::{self, Registrar, Registration};
use crate::output::progress;
use crate::swap::plan::{self, Params, Swap};
use spec::Spec;
use transport::Plan;

/// The cluster a command talks to: connected, its namespace checked, and
/// swaps whose session vanished (a laptop closed mid-session) repaired first.
pub async fn cluster(global: &GlobalArgs) -> anyhow::Result<Cluster> {
    let cluster = crate::cluster::connect(global).await?;
    checked(&cluster).await?;
    Ok(cluster)
}

/// The namespace checked and the abandoned swaps repaired, in one round trip
/// when there is nothing to repair: the namespace is read while the
/// Deployments are listed. Returns the repaired Deployments (`ns/name`).
async fn checked(cluster: &Cluster) -> anyhow::Result<Vec<String>> {
    let (exists, repaired) = tokio::join!(
        crate::checks::namespace_exists(cluster),
        crate::swap::apply::repair_abandoned(&cluster.client, Some(&cluster.namespace)),
    );
    exists?;
    repaired
}

/// [`cluster`] and [`check_target`] together: the target is read while the
/// namespace and the Deployments are, and read again only if the repair
/// restored it meanwhile. What fails is said in the same order as one
/// after the other.
pub async fn cluster_with_target(global: &GlobalArgs, spec: &Spec) -> anyhow::Result<(Cluster, Checked)> {
    let cluster = crate::cluster::connect(global).await?;
    let (repaired, target) = tokio::join!(checked(&cluster), check_target(&cluster, spec));
    let repaired = repaired?;
    let stale = spec.deployment().is_some_and(|t| repaired.contains(&format!("{}/{}", cluster.namespace, t.name)));
    let target = if stale { check_target(&cluster, spec).await? } else { target? };
    Ok((cluster, target))
}

/// The Deployment a swap's target check read, for the swap itself.
pub type Checked = Option<k8s_openapi::api::apps::v1::Deployment>;

/// Checks, before anything changes, the Deployment the session swaps or
/// intercepts: that it exists, its container, and for an intercept its ports.
pub async fn check_target(cluster: &Cluster, spec: &Spec) -> anyhow::Result<Checked> {
    let mut read = None;
    if let Some(target) = &spec.swap {
        read = Some(crate::swap::apply::check_target(cluster, target).await?);
    }
    if let Some(i) = &spec.intercept {
        let remotes: Vec<u16> = spec.session.ports.iter().map(|p| p.remote).collect();
        crate::intercept::apply::check(cluster, &i.target, &remotes, &i.filter, i.mirror).await?;
    }
    Ok(read)
}

/// What the session machinery works from.
#[derive(Debug)]
pub struct Context<'a> {
    pub cluster: &'a Cluster,
    pub spec: &'a Spec,
    pub images: &'a Images,
    pub id: &'a str,
    pub agent_pod: String,
    pub swap: Option<&'a Swap>,
    /// The session's intercept, for the registrar and the sidecar.
    pub intercept: Option<&'a Intercept>,
    /// The cluster's ranges the tunnel routes ([`ranges`]).
    pub routes: Vec<Cidr>,
}

/// The cluster's ranges the tunnel routes. Callers find them while the
/// agent pod starts: they do not depend on it. Without them the session
/// goes on with `--also-proxy` alone, if the user named ranges.
pub async fn ranges(cluster: &Cluster, spec: &Spec) -> anyhow::Result<Vec<Cidr>> {
    match cidrs::discover(&cluster.client).await {
        // The user named ranges: go on with those.
        Err(e) if !spec.session.also_proxy.is_empty() => {
            crate::output::warning(&format!("{}; routing only --also-proxy", crate::error::one_line(&e)));
            Ok(Vec::new())
        }
        found => found,
    }
}

impl Context<'_> {
    /// The volumes the session mounts: the swapped or intercepted container's.
    fn volumes(&self) -> Vec<tpd_wire::files::VolumeMount> {
        let swapped = self.swap.map(|s| &s.mounts);
        swapped.or(self.intercept.map(|i| &i.mounts)).cloned().unwrap_or_default()
    }
}

/// A fresh session id: short, and valid as a label value and container name.
pub fn new_id() -> String {
    format!("{:010x}", rand::random::<u64>() & 0xff_ffff_ffff)
}

/// `user@host`, as shown to anyone the swap is refused to.
pub fn holder() -> String {
    let uid = nix::unistd::getuid();
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| nix::unistd::User::from_uid(uid).ok().flatten().map(|u| u.name))
        .unwrap_or_else(|| uid.to_string());
    let host =
        nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown-host".into());
    format!("{user}@{host}")
}

/// The agent pod of a session without `--swap` (outbound only); the
/// cleanup deletes it by its session label.
pub fn outbound_agent_pod(namespace: &str, p: &Params) -> Pod {
    // It stands in for no container: it runs as the agent image's non-root user.
    let uid = i64::from(names::AGENT_UID);
    let identity = SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        ..Default::default()
    };
    let base = Container { name: "agent".into(), security_context: Some(identity), ..Default::default() };
    let labels = BTreeMap::from([
        (names::LABEL_MANAGED_BY.to_owned(), names::MANAGED_BY_VALUE.to_owned()),
        (names::LABEL_SESSION.to_owned(), p.session.clone()),
    ]);
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("tpd-agent-{}", p.session)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![plan::agent_container(&base, None, p, &[], &[])],
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

/// The per-session directory bind-mounted into the sidecar at
/// `names::SESSION_DIR`; only the user can enter it (it holds the env).
pub fn session_dir(id: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = session_dir_path(id);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Where a session's directory is (it may not exist).
pub fn session_dir_path(id: &str) -> PathBuf {
    crate::logging::cache_dir().join("sessions").join(id)
}

/// Runs the local half until the developer's container exits or `shutdown`
/// fires; returns the container's exit code.
pub async fn run(ctx: Context<'_>, args: &RunArgs, shutdown: &CancellationToken) -> anyhow::Result<i64> {
    let Started { sidecar, status, docker, registrar } = start(&ctx, shutdown).await?;
    let ran = async {
        let env = env::merge(status.env, &args.env, &args.env_file)?;
        tokio::select! {
            code = container::run(&docker, ctx.id, args, &sidecar, env, shutdown) => code,
            why = sidecar::stopped(&docker, &sidecar.id, &sidecar.name) => Err(sidecar_lost(why)),
        }
    }
    .await;
    if let Some(registrar) = registrar {
        registrar.end().await;
    }
    ran
}

/// The session ends when its sidecar does; the cleanup that follows removes
/// the developer's container, now in a network namespace that routes nowhere.
pub fn sidecar_lost(why: String) -> anyhow::Error {
    crate::error::Hint::new(
        format!("{why}; the session ended"),
        "start the session again; if the sidecar keeps stopping, `tpd doctor` checks Docker, TUN and FUSE",
    )
    .into()
}

/// The local half up to a ready sidecar (what `tpd connect` holds).
#[derive(Debug)]
pub struct Started {
    pub sidecar: sidecar::Sidecar,
    /// What the sidecar reported, with the agent's env.
    pub status: Status,
    pub docker: bollard::Docker,
    /// An intercept's registrations with its agents; [`Registrar::end`]
    /// unregisters them when the session ends.
    pub registrar: Option<Registrar>,
}

/// Registers an intercept with its agents, starts the relay (until
/// `shutdown`), the transport's cluster side (the NodePort Service for UDP)
/// and the sidecar, and waits until the sidecar reports the tunnel up.
pub async fn start(ctx: &Context<'_>, shutdown: &CancellationToken) -> anyhow::Result<Started> {
    let registrar = match ctx.intercept {
        Some(i) => {
            progress(&format!("registering with the intercept agents of {}", i.target));
            let registration = Registration {
                session: ctx.id.to_owned(),
                token: i.token.expose().to_owned(),
                holder: i.holder.clone(),
                since: i.since.clone(),
                routes: i.routes.clone(),
            };
            let traffic = i.traffic.clone();
            Some(register::start(ctx.cluster, i.selector.clone(), registration, traffic, shutdown.clone()).await?)
        }
        None => None,
    };
    let agents = match &registrar {
        Some(r) => relay::Agents::Home(r.home()),
        None => relay::Agents::Session { session: ctx.id.to_owned(), first: ctx.agent_pod.clone() },
    };
    match start_tunnel(ctx, agents, shutdown).await {
        Ok(started) => Ok(Started { registrar, ..started }),
        Err(e) => {
            if let Some(registrar) = registrar {
                registrar.end().await;
            }
            Err(e)
        }
    }
}

/// [`start`] from the relay on, its tunnel going to `agents`.
async fn start_tunnel(
    ctx: &Context<'_>,
    agents: relay::Agents,
    shutdown: &CancellationToken,
) -> anyhow::Result<Started> {
    let plan = transport::prepare(ctx.cluster, ctx.spec.session.transport, ctx.id, &ctx.agent_pod).await?;
    let shown: Vec<String> = ctx.routes.iter().chain(&ctx.spec.session.also_proxy).map(ToString::to_string).collect();
    progress(&format!("cluster ranges routed through the tunnel: {}", shown.join(", ")));
    let dir = session_dir(ctx.id)?;
    let relay = relay::start(&dir, ctx.cluster, agents, shutdown.clone())?;
    let docker = crate::docker::connect().await?;
    let volumes = if ctx.spec.session.no_mounts { Vec::new() } else { ctx.volumes() };
    progress("starting the sidecar");
    let sidecar = sidecar::start(&docker, ctx, &dir, &relay, &plan, &volumes).await?;
    let mut status = tokio::select! {
        s = sidecar::ready(&docker, &sidecar, &dir, Duration::from_secs(30)) => s.map_err(|e| not_ready(e, &plan))?,
        () = shutdown.cancelled() => anyhow::bail!("interrupted before the sidecar was ready"),
    };
    tokio::spawn(sidecar::warnings(docker.clone(), sidecar.id.clone()));
    let used = status.transport.unwrap_or(match plan {
        Plan::PortForward => Carrier::Stream,
        Plan::Udp { .. } => Carrier::Udp,
    });
    progress(&format!("session ready ({})", transport_line(ctx.cluster, ctx.id, &plan, used).await));
    status.transport = Some(used);
    Ok(Started { sidecar, status, docker, registrar: None })
}

/// Says which transport carries the session (and why, after a fallback);
/// an unused NodePort goes at once.
async fn transport_line(cluster: &Cluster, id: &str, plan: &Plan, used: Carrier) -> String {
    let line = match (plan, used) {
        (Plan::PortForward, _) => "transport: port-forward".to_owned(),
        (Plan::Udp { at, service, .. }, Carrier::Udp) => {
            format!("transport: udp to {at}, service/{service}")
        }
        (Plan::Udp { at, fallback, .. }, Carrier::Stream) => {
            transport::release_unused(cluster, id).await;
            let window = fallback.unwrap_or(transport::UDP_FALLBACK);
            format!("transport: port-forward; udp to {at} got no answer within {} s", window.as_secs_f64())
        }
    };
    tracing::info!("{line}");
    line
}

/// A sidecar that never got ready over UDP without a fallback: say what to try.
fn not_ready(e: anyhow::Error, plan: &Plan) -> anyhow::Error {
    match plan {
        Plan::Udp { at, fallback: None, .. } => crate::error::Hint::new(
            format!(
                "the tunnel did not come up over udp to {at} (is that node port reachable from this machine?): {e:#}"
            ),
            "use `--transport portforward` (works on every cluster) or `--transport auto`",
        )
        .into(),
        _ => e,
    }
}
