//! `tpd-agent`: runs in the cluster in place of the swapped container, as a
//! non-root user with no capabilities. It owns the WireGuard endpoint, the
//! userspace TCP/IP stack that turns tunnelled packets into ordinary sockets
//! in the pod's network, and the control (version, health, env) and file
//! services inside the tunnel (the file service is `tpd_volumes::server`),
//! and DNS on the tunnel address over UDP and TCP.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod control;
mod inbound;
mod neighbours;
mod services;
mod stack;
mod transport;
mod window;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tpd_tunnel::Endpoint;
use tpd_tunnel::udp::TunnelUdp;
use tpd_volumes::server as files;
use tpd_wire::names::{self, agent_env};

use crate::control::Control;
use crate::inbound::Inbound;
use crate::services::Services;
use crate::stack::{Ingress, Stack};
use crate::window::SendWindow;

#[derive(Debug, Parser)]
#[command(name = "tpd-agent", version = tpd_wire::VERSION, about)]
struct Args {
    /// Where the transport arrives: TCP (framed stream, e.g. a port-forward) and UDP, same port.
    /// A stream is admitted only over the pod's loopback, where a port-forward lands.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], names::AGENT_TRANSPORT_PORT)))]
    listen: SocketAddr,
    /// Ports of the swapped container; cluster clients connecting to them reach the developer's app.
    #[arg(long, env = agent_env::PORTS, value_delimiter = ',')]
    ports: Vec<u16>,
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
    let streams = TcpListener::bind(args.listen).await.with_context(|| format!("listening on TCP {}", args.listen))?;
    let udp = TunnelUdp::bind(args.listen).await.with_context(|| format!("listening on UDP {}", args.listen))?;
    let (ingress, queues) = Ingress::new();
    let wg = Arc::new(Endpoint::new(None, move |packet| ingress.deliver(packet)));

    let window = Arc::new(SendWindow::default());
    let control = Arc::new(Control::new(window.clone()));
    let inbound = Arc::new(Inbound::new(control.clone()));
    inbound.clone().listen(&args.ports).await?;
    let mounts = Arc::new(files::MountTable::from_env().context("reading the volume mounts to serve")?);
    let own = neighbours::Own::new(&args.ports);
    tokio::spawn(neighbours::watch(own.clone(), control.clone()));
    let nameservers = stack::dns::system_nameservers();
    let services = local_services(control, inbound, mounts, nameservers.clone());
    Stack::start(wg.clone(), services, own, queues, window.clone(), nameservers);

    let mut tasks = JoinSet::new();
    let (streams_wg, streams_window) = (wg.clone(), window.clone());
    tasks.spawn(async move {
        transport::serve_streams(streams, streams_wg, streams_window).await;
        "the transport's stream listener"
    });
    let udp_wg = wg.clone();
    tasks.spawn(async move {
        transport::serve_udp(udp, udp_wg, window).await;
        "the transport's UDP socket"
    });
    tasks.spawn(async move {
        wg.run_timers().await;
        "the WireGuard timers"
    });
    tracing::info!(version = tpd_wire::VERSION, listen = %args.listen, ports = ?args.ports, "agent ready");
    Ok(tasks)
}

/// The services on the agent's tunnel address, by port.
fn local_services(
    control: Arc<Control>,
    inbound: Arc<Inbound>,
    mounts: Arc<files::MountTable>,
    nameservers: Arc<[SocketAddr]>,
) -> Services {
    let mut services = Services::default();
    services.insert(names::AGENT_CONTROL_PORT, move |c| {
        let control = control.clone();
        async move { control.serve(c).await }
    });
    services.insert(names::AGENT_INBOUND_PORT, move |c| {
        let inbound = inbound.clone();
        async move { inbound.relay(c).await }
    });
    // DNS over TCP, for answers too large for UDP (UDP is the stack's own).
    services.insert(names::AGENT_DNS_PORT, move |c| stack::dns::serve_tcp(c, nameservers.clone()));
    services.insert(names::AGENT_FILES_PORT, move |c| {
        let mounts = mounts.clone();
        async move {
            if let Err(e) = files::serve_connection(c, mounts).await {
                tracing::warn!("file service connection closed: {e}");
            }
        }
    });
    services
}
