//! `tpd-agent`: runs in the cluster in place of the swapped container, or
//! beside the app container of each pod of an intercepted workload (with
//! `TPD_AGENT_INTERCEPT`), as a non-root user with no capabilities. It owns the WireGuard endpoint, the
//! userspace TCP/IP stack that turns tunnelled packets into ordinary sockets
//! in the pod's network, and the control (version, health, env) and file
//! services inside the tunnel (the file service is `tpd_volumes::server`),
//! and DNS on the tunnel address over UDP and TCP.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod control;
mod inbound;
mod instance;
mod intercept;
mod neighbours;
mod services;
mod stack;
mod transport;
mod window;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tpd_tunnel::StaticKey;
use tpd_tunnel::udp::TunnelUdp;
use tpd_volumes::server as files;
use tpd_wire::intercept::{Config, LEASE};
use tpd_wire::names::{self, agent_env};

use crate::instance::{Instance, Instances, Shared};
use crate::intercept::reach::Sessions;
use crate::intercept::registry::Registry;
use crate::intercept::router::Router;

#[derive(Debug, Parser)]
#[command(name = "tpd-agent", version = tpd_wire::VERSION, about)]
struct Args {
    /// Where the transport arrives: TCP (framed stream, e.g. a port-forward) and UDP, same port.
    /// A stream is admitted only over the pod's loopback, where a port-forward lands.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], names::AGENT_TRANSPORT_PORT)))]
    listen: SocketAddr,
    /// Ports of the swapped container; cluster clients connecting to them reach the developer's app.
    #[arg(long, env = agent_env::PORTS, value_delimiter = ',', conflicts_with = "intercept")]
    ports: Vec<u16>,
    /// Run beside the app container and route its requests by session
    /// (JSON `tpd_wire::intercept::Config`); the transport then listens on
    /// its `transport` port, over TCP only.
    #[arg(long, env = agent_env::INTERCEPT, value_parser = parse_intercept)]
    intercept: Option<Config>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(agent_env::LOG)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tpd_agent=info,warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    map_large_buffers();

    let mut tasks = run(args).await?;
    tokio::select! {
        () = tpd_tunnel::io::shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
        // They run for the agent's life: one ending means the agent can no
        // longer serve, and exiting lets the kubelet restart it.
        Some(ended) = tasks.join_next() => match ended {
            Ok(task) => anyhow::bail!("{task} stopped; exiting"),
            Err(e) => anyhow::bail!("a task of the agent failed ({e}); exiting"),
        },
    }
}

/// Every tunnelled connection allocates its socket buffers (1.5 MiB) and
/// frees them when it closes. glibc raises its mmap threshold to the size of
/// the first large block freed, after which these buffers come from the
/// heap: `calloc` then zeroes, so touches, every page, and freed space stays
/// resident in the arenas (at 100 new connections/s the agent held 135-176
/// MiB). A fixed threshold keeps them mmapped: a page is touched only when
/// data passes through it and goes back to the kernel when the connection
/// closes (the same load: 20 MiB).
fn map_large_buffers() {
    const MMAP_THRESHOLD: libc::c_int = 128 * 1024;
    // SAFETY: mallopt only sets an allocator parameter; it takes the
    // allocator's own lock and touches no memory of ours.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused; large buffers may stay resident");
    }
}

/// Starts the agent's services; returns the tasks that serve the tunnel,
/// each ending with its name (dropping the set stops them).
async fn run(args: Args) -> anyhow::Result<JoinSet<&'static str>> {
    let mounts = Arc::new(files::MountTable::from_env().context("reading the volume mounts to serve")?);
    let own = match &args.intercept {
        Some(config) => neighbours::Own::intercept(config),
        None => neighbours::Own::new(&args.ports),
    };
    let pod_ports = watch::Sender::new(Vec::new());
    let found = pod_ports.clone();
    let shared = Shared {
        key: StaticKey::generate(),
        mounts,
        nameservers: stack::dns::system_nameservers(),
        own: own.clone(),
        pod_ports,
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        neighbours::watch(own, found).await;
        "the neighbour ports' watch"
    });
    match args.intercept {
        Some(config) => run_intercept(args.listen, config, shared, &mut tasks).await?,
        None => run_swap(args.listen, &args.ports, shared, &mut tasks).await?,
    }
    Ok(tasks)
}

/// A swapped or outbound-only agent: one instance, locked to the first
/// sidecar, its transport over TCP and UDP, listeners on the swapped ports.
async fn run_swap(
    listen: SocketAddr,
    ports: &[u16],
    shared: Shared,
    tasks: &mut JoinSet<&'static str>,
) -> anyhow::Result<()> {
    let streams = TcpListener::bind(listen).await.with_context(|| format!("listening on TCP {listen}"))?;
    let udp = TunnelUdp::bind(listen).await.with_context(|| format!("listening on UDP {listen}"))?;
    let instance = Instance::start(&shared);
    instance.inbound.clone().listen(ports).await?;
    let instances = Instances::single(&shared, instance.clone());
    tasks.spawn(async move {
        transport::serve_streams(streams, instances).await;
        "the transport's stream listener"
    });
    let udp_instance = instance.clone();
    tasks.spawn(async move {
        transport::serve_udp(udp, udp_instance).await;
        "the transport's UDP socket"
    });
    tasks.spawn(async move { instance.ended().await });
    tracing::info!(version = tpd_wire::VERSION, %listen, ?ports, "agent ready");
    Ok(())
}

/// An intercept agent, beside the app: an instance per sidecar, over TCP
/// streams only (a UDP datagram does not say which sidecar sent it, and
/// every developer reaches the pod through a port-forward anyway); the
/// intercept port; a router on each listening port.
async fn run_intercept(
    listen: SocketAddr,
    config: Config,
    shared: Shared,
    tasks: &mut JoinSet<&'static str>,
) -> anyhow::Result<()> {
    // Every port bound first, so that a taken one fails the agent's start.
    let bind = |port: u16| async move {
        let addr = SocketAddr::new(listen.ip(), port);
        TcpListener::bind(addr).await.with_context(|| format!("listening on TCP {addr}"))
    };
    let streams = bind(config.transport).await?;
    let intercept_port = bind(config.intercept).await?;
    let mut routers = Vec::new();
    for map in &config.ports {
        routers.push((map.remote, bind(map.listen).await?));
    }

    let instances = Instances::per_key(shared);
    let registry = Arc::new(Registry::new(config.ports.iter().map(|p| p.remote), LEASE));
    let sweep = instances.clone();
    tasks.spawn(async move {
        sweep.sweep(instance::IDLE, IDLE_SWEEP_EVERY).await;
        "the sweep of idle sessions"
    });
    let (port_registry, port_instances) = (registry.clone(), instances.clone());
    tasks.spawn(async move {
        intercept::port::serve(intercept_port, port_registry, port_instances).await;
        "the intercept port"
    });
    for (remote, listener) in routers {
        let router = Router::new(remote, registry.clone(), Sessions(instances.clone()));
        tasks.spawn(async move {
            router.serve(listener).await;
            "an intercepted port's router"
        });
    }
    tasks.spawn(async move {
        transport::serve_streams(streams, instances).await;
        "the transport's stream listener"
    });
    tracing::info!(version = tpd_wire::VERSION, ?config, "intercept agent ready");
    Ok(())
}

/// How often an intercept agent looks for sessions to drop.
const IDLE_SWEEP_EVERY: Duration = Duration::from_secs(10);

/// `TPD_AGENT_INTERCEPT`'s JSON.
fn parse_intercept(json: &str) -> Result<Config, String> {
    serde_json::from_str(json).map_err(|e| format!("not an intercept config: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the CLI sets, and that it excludes the swap's ports.
    #[test]
    fn the_intercept_config_is_read_from_its_json() {
        let json = r#"{"transport":7710,"intercept":7711,"ports":[{"remote":8080,"listen":18080}]}"#;
        let args = Args::try_parse_from(["tpd-agent", "--intercept", json]).unwrap();
        let config = args.intercept.unwrap();
        assert_eq!((config.transport, config.intercept), (7710, 7711));
        assert_eq!(config.ports, [tpd_wire::intercept::PortMap { remote: 8080, listen: 18080 }]);
        assert!(Args::try_parse_from(["tpd-agent", "--intercept", "{"]).is_err());
        assert!(Args::try_parse_from(["tpd-agent", "--intercept", json, "--ports", "8080"]).is_err());
    }
}
