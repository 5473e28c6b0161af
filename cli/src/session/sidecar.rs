//! The sidecar container: it owns the network namespace the developer's
//! container joins (TUN, routes, DNS at 127.0.0.1 with the cluster's search
//! path), the WireGuard session over the relay's socket, and the FUSE mounts
//! of the remote volumes. It writes `status.json` into the session
//! directory when the tunnel is up; that file holds the agent's env.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceMapping, HostConfig, PortBinding, VolumeCreateRequest};
use bollard::query_parameters::{CreateContainerOptions, InspectContainerOptions, LogsOptions};
use futures::StreamExt;
use tpd_wire::files::VolumeMount;
use tpd_wire::names;
use tpd_wire::neighbours::Declared;
use tpd_wire::sidecar::{Carrier, Config, Endpoint, Event, PortMap, Status, Transport, Volumes};

use super::Context;
use super::relay::Relay;
use super::transport::Plan;
use crate::cli::VolumeCache;
use crate::error::Hint;
use crate::mounts::{self, VolumeMounts};

/// A started sidecar.
#[derive(Debug)]
pub struct Sidecar {
    pub id: String,
    /// `tpd-sidecar-<session>`, as `docker ps` shows it.
    pub name: String,
    /// Mounts for the developer's container, when remote volumes are shown.
    pub volumes: Option<VolumeMounts>,
}

/// The transport named in a session directory's `status.json`, for `tpd
/// status`.
pub fn transport_in(dir: &Path) -> Option<Carrier> {
    let text = std::fs::read_to_string(dir.join(names::STATUS_FILE)).ok()?;
    serde_json::from_str::<Status>(&text).ok()?.transport
}

/// Labels of everything local the session creates, found by cleanup.
pub fn labels(session: &str) -> HashMap<String, String> {
    HashMap::from([
        (names::LABEL_MANAGED_BY.to_owned(), names::MANAGED_BY_VALUE.to_owned()),
        (names::LABEL_SESSION.to_owned(), session.to_owned()),
    ])
}

/// The sidecar's configuration: the transport (the relay's socket carries
/// the hello, and WireGuard too unless it goes over UDP), the routes, the
/// inbound port map, and the host's resolver for names outside the cluster.
fn config(ctx: &Context<'_>, relay: &Relay, plan: &Plan, volumes: &[VolumeMount]) -> Config {
    let stream = Endpoint::Unix(relay.socket_in_sidecar.clone().into());
    let mut config = match plan {
        Plan::PortForward => Config::new(Transport::Stream(stream)),
        Plan::Udp { at, fallback, .. } => {
            Config { hello: Some(stream), udp_fallback: *fallback, ..Config::new(Transport::Udp(*at)) }
        }
    };
    config.routes = ctx.routes.iter().chain(&ctx.spec.session.also_proxy).copied().collect();
    config.ports = ctx.spec.session.ports.iter().map(|p| PortMap { remote: p.remote, local: p.local }).collect();
    config.pod_ports = pod_ports(ctx);
    config.session = Some(ctx.id.to_owned());
    config.dns.upstream = host_resolver();
    config.volumes = (!volumes.is_empty()).then(|| Volumes {
        retry_for: ctx.spec.volume_timeout.map_or(VOLUME_RETRY_FOR, Duration::from_secs),
        cache: ctx.spec.session.volume_cache == VolumeCache::On,
    });
    config
}

/// The pod's ports the sidecar carries to 127.0.0.1 from the start: those
/// the pod's other containers declare, less the local ports of `--port`
/// (the developer's), and `--pod-port`'s.
fn pod_ports(ctx: &Context<'_>) -> Vec<Declared> {
    let developers = |d: &&Declared| !ctx.spec.session.ports.iter().any(|p| p.local == d.port.port);
    let swapped = ctx.swap.iter().flat_map(|s| s.neighbours.iter());
    let intercepted = ctx.intercept.iter().flat_map(|i| i.neighbours.iter());
    let declared = swapped.chain(intercepted).filter(developers).cloned();
    let by_hand = ctx.spec.session.pod_ports.iter().map(|&port| Declared { port, owner: "--pod-port".into() });
    declared.chain(by_hand).collect()
}

/// How long a volume request waits for a lost agent by default (`--volume-timeout`).
const VOLUME_RETRY_FOR: Duration = Duration::from_secs(30);

/// The host's first resolver that a container can reach (not loopback).
fn host_resolver() -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .find(|ip| !ip.is_loopback())
        .map(|ip| SocketAddr::new(ip, 53))
}

pub async fn start(
    docker: &Docker,
    ctx: &Context<'_>,
    dir: &Path,
    relay: &Relay,
    plan: &Plan,
    volumes: &[VolumeMount],
) -> anyhow::Result<Sidecar> {
    let config = serde_json::to_string(&config(ctx, relay, plan, volumes))?;
    // The developer's container joins this network namespace and gets the
    // sidecar's hostname, /etc/hosts and /etc/resolv.conf with it.
    let deployment = ctx.swap.map(|s| &s.deployment).or(ctx.intercept.map(|i| &i.deployment));
    let pod = deployment.and_then(|d| d.spec.as_ref()).and_then(|d| d.template.spec.as_ref());
    let naming = super::naming::naming(pod, &ctx.agent_pod, &ctx.cluster.namespace);
    let mut host = HostConfig {
        cap_add: Some(vec!["NET_ADMIN".into()]),
        devices: Some(vec![device("/dev/net/tun")]),
        dns: Some(vec!["127.0.0.1".into()]),
        dns_search: Some(naming.search),
        dns_options: Some(naming.options),
        extra_hosts: Some(naming.extra_hosts),
        binds: Some(vec![format!("{}:{}", dir.display(), names::SESSION_DIR)]),
        port_bindings: Some(
            ctx.spec
                .session
                .publish
                .iter()
                .map(|p| {
                    (
                        format!("{}/tcp", p.container),
                        Some(vec![PortBinding { host_ip: None, host_port: Some(p.host.to_string()) }]),
                    )
                })
                .collect(),
        ),
        ..Default::default()
    };
    let volume_mounts = match volumes.is_empty() {
        true => None,
        false => {
            let host_dir = volume_dir(docker, ctx.id).await?;
            let root = ctx.spec.mount_root.as_deref().unwrap_or(mounts::DEFAULT_MOUNT_ROOT);
            let planned = mounts::plan(&host_dir, volumes, root);
            host.cap_add.get_or_insert_with(Vec::new).push("SYS_ADMIN".into());
            host.devices.get_or_insert_with(Vec::new).push(device("/dev/fuse"));
            host.security_opt = Some(vec!["apparmor:unconfined".into()]);
            host.mounts = Some(planned.sidecar.clone());
            Some(planned)
        }
    };
    let body = ContainerCreateBody {
        image: Some(ctx.images.sidecar.clone()),
        hostname: Some(naming.hostname),
        domainname: naming.domainname,
        cmd: Some(vec!["run".into(), "--config".into(), config]),
        labels: Some(labels(ctx.id)),
        exposed_ports: Some(ctx.spec.session.publish.iter().map(|p| format!("{}/tcp", p.container)).collect()),
        host_config: Some(host),
        ..Default::default()
    };
    let name = format!("tpd-sidecar-{}", ctx.id);
    let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
    let id = docker.create_container(Some(options), body).await.context("cannot create the sidecar container")?.id;
    docker.start_container(&id, None).await.with_context(|| format!("cannot start the sidecar container {name}"))?;
    Ok(Sidecar { id, name, volumes: volume_mounts })
}

/// A Docker volume on the engine's (shared) data root, labelled for cleanup;
/// see `mounts.rs` for why its mount point carries the FUSE mounts.
async fn volume_dir(docker: &Docker, session: &str) -> anyhow::Result<String> {
    let request = VolumeCreateRequest {
        name: Some(format!("tpd-{session}-volumes")),
        labels: Some(labels(session)),
        ..Default::default()
    };
    let volume = docker.create_volume(request).await.context("cannot create the session's volume directory")?;
    Ok(volume.mountpoint)
}

fn device(path: &str) -> DeviceMapping {
    DeviceMapping {
        path_on_host: Some(path.into()),
        path_in_container: Some(path.into()),
        cgroup_permissions: Some("rwm".into()),
    }
}

/// Waits for `status.json`; if the sidecar exits first, fails with the
/// error it reported, or its last log lines when it reported none.
pub async fn ready(docker: &Docker, sidecar: &Sidecar, dir: &Path, timeout: Duration) -> anyhow::Result<Status> {
    let path = dir.join(names::STATUS_FILE);
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(status) = serde_json::from_str::<Status>(&text)
        {
            return Ok(status);
        }
        let state = docker.inspect_container(&sidecar.id, None::<InspectContainerOptions>).await?.state;
        if state.and_then(|s| s.running) == Some(false) {
            let logs = last_logs(docker, &sidecar.id).await;
            // Warnings may come first: the error line is the one that counts.
            let error = logs.lines().filter_map(Event::from_line).find_map(|e| match e {
                Event::Error { message } => Some(message),
                _ => None,
            });
            let message = match error {
                Some(message) => format!("the sidecar failed: {message}"),
                None => {
                    // Its last words go to the log; the terminal gets one line.
                    tracing::info!("the sidecar's last log lines:\n{logs}");
                    "the sidecar exited before the session was ready".to_owned()
                }
            };
            return Err(Hint::new(message, SIDECAR_HELP).into());
        }
        if started.elapsed() > timeout {
            tracing::info!("the sidecar's last log lines:\n{}", last_logs(docker, &sidecar.id).await);
            return Err(Hint::new(
                format!("the sidecar was not ready after {} s", timeout.as_secs()),
                format!("a slow machine or image pull may need more: --ready-timeout SECONDS; {SIDECAR_HELP}"),
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What to do when the sidecar does not start.
const SIDECAR_HELP: &str = "`tpd doctor` checks what the sidecar needs (TUN, FUSE, NET_ADMIN); --verbose shows its log";

/// Prints the sidecar's warnings (a pod port the developer's side already
/// holds) as they come, from its start until it is gone.
pub async fn warnings(docker: Docker, id: String) {
    let options = LogsOptions { follow: true, stdout: true, ..Default::default() };
    let mut logs = docker.logs(&id, Some(options));
    while let Some(Ok(chunk)) = logs.next().await {
        for event in chunk.to_string().lines().filter_map(Event::from_line) {
            if let Event::Warning { message } = event {
                crate::output::warning(&message);
            }
        }
    }
}

/// Waits until the sidecar stops (killed, OOM, a Docker restart) and says
/// what happened, for the session to end on it: without the sidecar the
/// developer's container is in a network namespace that routes nowhere.
pub async fn stopped(docker: &Docker, id: &str, name: &str) -> String {
    let why = crate::docker::wait_ended(docker, id).await.why().unwrap_or_else(|| "stopped".into());
    format!("the sidecar container {name} {why}")
}

async fn last_logs(docker: &Docker, id: &str) -> String {
    let options = LogsOptions { stdout: true, stderr: true, tail: "20".into(), ..Default::default() };
    let lines: Vec<String> =
        docker.logs(id, Some(options)).filter_map(|l| async { l.ok().map(|l| l.to_string()) }).collect().await;
    lines.concat()
}
