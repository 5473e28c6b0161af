//! `tpd-sidecar`: the only privileged piece of tpd, and it runs locally.
//! It owns the TUN device in the session's network namespace, the boringtun
//! session to the agent, the DNS server the developer's container uses, and
//! the FUSE mounts of the remote volumes.

// Property tests unwrap inside proptest!, which clippy does not see as a test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod config;
mod control;
mod dns;
mod fuse;
mod selfcheck;
mod transport;
mod tun;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tpd_wire::names;
use tpd_wire::tunnel::Endpoint as Wg;

use crate::config::{Cidr, Endpoint, PortMap, Transport};
use crate::control::Control;
use crate::tun::Tun;

#[derive(Debug, Parser)]
#[command(name = "tpd-sidecar", version = tpd_wire::VERSION, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring the tunnel up and serve DNS until stopped.
    Run(Box<RunArgs>),
    /// Check that this host lets the sidecar create a TUN device and open /dev/fuse (used by `tpd doctor`).
    Selfcheck,
    /// Unmount what a killed sidecar left below the volume directory (run by tpd's cleanup; needs SYS_ADMIN).
    ReleaseVolumes {
        /// The directory holding the volumes' mount points.
        #[arg(long, default_value = tpd_wire::files::SIDECAR_VOLUMES_DIR)]
        root: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// How WireGuard reaches the agent: stream:tcp:IP:PORT, stream:unix:/path or udp:IP:PORT.
    #[arg(long)]
    transport: Transport,
    /// For a udp transport, where the key exchange stream goes (default: TCP to the same address).
    #[arg(long)]
    hello: Option<Endpoint>,
    /// For a udp transport: when no answer comes over UDP within SECONDS of the
    /// first handshake, carry WireGuard over the hello stream instead.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    udp_fallback: Option<std::time::Duration>,
    /// A cluster CIDR (pods, services) routed into the tunnel. Repeatable.
    #[arg(long = "cluster-cidr")]
    cluster_cidrs: Vec<Cidr>,
    /// Another CIDR to route into the tunnel. Repeatable.
    #[arg(long = "also-proxy")]
    also_proxy: Vec<Cidr>,
    /// Names under this domain are resolved by the agent.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Resolve every name through the agent.
    #[arg(long)]
    dns_all_cluster: bool,
    /// Resolver for names outside the cluster (IP or IP:PORT); without it they are refused.
    #[arg(long, value_parser = parse_resolver)]
    upstream_dns: Option<SocketAddr>,
    /// Where the DNS server listens.
    #[arg(long, default_value = "127.0.0.1:53")]
    dns_listen: SocketAddr,
    /// REMOTE:LOCAL: inbound connections to the agent's port REMOTE reach 127.0.0.1:LOCAL. Repeatable.
    #[arg(long = "port")]
    ports: Vec<PortMap>,
    /// Directory for status.json (and the CLI's Unix socket).
    #[arg(long, default_value = names::SESSION_DIR)]
    session_dir: PathBuf,
    /// FUSE-mount the agent's volumes (needs SYS_ADMIN and /dev/fuse) before announcing ready.
    #[arg(long)]
    volumes: bool,
    /// How long a volume request waits for a lost connection to the agent
    /// (its pod replaced) to come back before the program gets EIO.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, default_value = "30")]
    volume_timeout: std::time::Duration,
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<f64>()
        .ok()
        .and_then(|secs| std::time::Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

fn parse_resolver(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|e| format!("{s:?} is not an IP or IP:PORT ({e})"))
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = match Args::parse().command {
        Command::Run(args) => *args,
        Command::Selfcheck => return Ok(selfcheck::run()),
        Command::ReleaseVolumes { root } => return Ok(fuse::release(&root)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TPD_SIDECAR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tpd_sidecar=info,warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let shutdown = CancellationToken::new();
    // The session runs as a task, not in `main`'s own future: that one
    // runs on the main thread, outside the runtime's workers, so every
    // frame the stream transport read would first wake it from the worker
    // that saw the socket ready (a futex round trip per packet).
    let mut session = tokio::spawn(run(args, shutdown.clone()));
    let result = tokio::select! {
        r = &mut session => r.unwrap_or_else(|e| Err(anyhow::anyhow!("the session task failed: {e}"))),
        () = tpd_wire::io::shutdown_signal() => {
            session.abort();
            let _ = session.await;
            Ok(())
        }
    };
    shutdown.cancel();
    if let Err(e) = &result {
        // The CLI reads stdout: failures are an event there too.
        println!("{}", serde_json::json!({ "event": "error", "message": format!("{e:#}") }));
    }
    result.map(|()| std::process::ExitCode::SUCCESS)
}

/// Runs until a fatal error; everything else is retried inside.
async fn run(args: RunArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let routes: Vec<Cidr> = args.cluster_cidrs.iter().chain(&args.also_proxy).copied().collect();
    // Datagrams over UDP must fit the path; frames on a stream need not. A
    // UDP transport that falls back to the stream raises the MTU then.
    let mtu = match args.transport {
        Transport::Stream(_) => names::STREAM_TUNNEL_MTU,
        Transport::Udp(_) => names::TUNNEL_MTU,
    };
    let tun = Arc::new(
        Tun::create(names::SIDECAR_TUNNEL_IP, names::TUNNEL_PREFIX_LEN, mtu, &routes)
            .context("setting up the tunnel device")?,
    );
    let grow = tun.clone();
    let sink = tun.clone();
    let wg = Arc::new(Wg::new(Some(25), move |packet| sink.write(packet)));

    let dns_sock =
        UdpSocket::bind(args.dns_listen).await.with_context(|| format!("DNS listening on {}", args.dns_listen))?;
    let routing = dns::Routing {
        cluster_domain: args.cluster_domain.clone(),
        all_to_cluster: args.dns_all_cluster,
        upstream: args.upstream_dns,
    };
    let hello_at = match (&args.transport, args.hello) {
        (_, Some(at)) => at,
        (Transport::Stream(at), None) => at.clone(),
        (Transport::Udp(addr), None) => Endpoint::Tcp(*addr),
    };
    let ports: HashMap<u16, u16> = args.ports.iter().map(|p| (p.remote, p.local)).collect();
    let control = Arc::new(Control {
        session_dir: args.session_dir,
        ports,
        volumes: args.volumes.then(|| shutdown.clone()),
        volume_timeout: args.volume_timeout,
        mounted: Default::default(),
    });

    let tasks = [
        tokio::spawn(dns::serve(dns_sock, routing)),
        tokio::spawn(tun_to_wg(tun, wg.clone())),
        tokio::spawn(wg.clone().run_timers()),
        tokio::spawn(control.run()),
        tokio::spawn(async move {
            if mtu != names::STREAM_TUNNEL_MTU
                && transport::decided().await == transport::Chosen::Stream
                && let Err(e) = grow.set_mtu(names::STREAM_TUNNEL_MTU)
            {
                tracing::warn!("keeping the tunnel MTU at {}: {e}", names::TUNNEL_MTU);
            }
        }),
    ];
    let result = transport::run(args.transport, hello_at, args.udp_fallback, wg).await;
    tasks.iter().for_each(|t| t.abort());
    result
}

/// Packets the developer's container sends into the tunnel, a burst at a time.
async fn tun_to_wg(tun: Arc<Tun>, wg: Arc<Wg>) {
    const BATCH: usize = 64;
    // Room for a full batch at the UDP transport's MTU, or two at the stream's.
    let mut arena = vec![0u8; 2 * tun::MAX_PACKET + BATCH * usize::from(names::TUNNEL_MTU)];
    let mut packets = Vec::with_capacity(BATCH);
    loop {
        packets.clear();
        if let Err(e) = tun.read_batch(&mut arena, &mut packets, BATCH).await {
            tracing::error!("reading the tunnel device: {e}");
            return;
        }
        wg.send_ips(packets.iter().map(|r| &arena[r.clone()]));
    }
}
