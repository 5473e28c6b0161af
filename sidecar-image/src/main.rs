//! `tpd-sidecar`: the only privileged piece of tpd, and it runs locally.
//! It owns the TUN device in the session's network namespace, the boringtun
//! session to the agent, the DNS server the developer's container uses, and
//! the FUSE mounts of the remote volumes (`tpd_volumes::fuse`).

// Property tests unwrap inside proptest!, which clippy does not see as a test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod control;
mod dns;
mod neighbours;
mod selfcheck;
mod transport;
mod tun;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tpd_tunnel::Endpoint as Wg;
use tpd_wire::names;
use tpd_wire::sidecar::{Carrier, Config, Event, Transport};

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
    /// The session's configuration as JSON (`tpd_wire::sidecar::Config`),
    /// written by the CLI; see `docker inspect` of a running sidecar.
    #[arg(long, value_parser = parse_config)]
    config: Config,
}

fn parse_config(s: &str) -> Result<Config, String> {
    serde_json::from_str(s).map_err(|e| format!("not a sidecar configuration: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = match Args::parse().command {
        Command::Run(args) => args.config,
        Command::Selfcheck => return Ok(selfcheck::run()),
        Command::ReleaseVolumes { root } => return Ok(tpd_volumes::fuse::release(&root)),
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
        () = tpd_tunnel::io::shutdown_signal() => {
            session.abort();
            let _ = session.await;
            Ok(())
        }
    };
    shutdown.cancel();
    if let Err(e) = &result {
        // The CLI reads stdout: failures are an event there too.
        let event = Event::Error { message: format!("{e:#}") };
        println!("{}", serde_json::to_string(&event).unwrap_or_default());
    }
    result.map(|()| std::process::ExitCode::SUCCESS)
}

/// Runs until a fatal error; everything else is retried inside.
async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Datagrams over UDP must fit the path; frames on a stream need not. A
    // UDP transport that falls back to the stream raises the MTU then.
    let mtu = match config.transport {
        Transport::Stream(_) => names::STREAM_TUNNEL_MTU,
        Transport::Udp(_) => names::TUNNEL_MTU,
    };
    let tun = Arc::new(
        Tun::create(names::SIDECAR_TUNNEL_IP, names::TUNNEL_PREFIX_LEN, mtu, &config.routes)
            .context("setting up the tunnel device")?,
    );
    let grow = tun.clone();
    let sink = tun.clone();
    let wg = Arc::new(Wg::new(Some(25), move |packet| sink.write(packet)));

    let listen = config.dns.listen;
    let dns_udp = UdpSocket::bind(listen).await.with_context(|| format!("DNS listening on UDP {listen}"))?;
    let dns_tcp = TcpListener::bind(listen).await.with_context(|| format!("DNS listening on TCP {listen}"))?;
    let hello_at = config.hello_at();
    let link = transport::Link::new();
    // The declared pod ports listen from the start, before the developer's
    // container does; the local ports of `--port` are the developer's.
    let neighbours = neighbours::Neighbours::new(config.pod_ports.clone(), config.ports.iter().map(|p| p.local));
    neighbours.apply(&[]);
    let control = Arc::new(Control {
        session_dir: config.session_dir.clone(),
        ports: config.port_map(),
        volumes: config.volumes.clone().map(|v| (shutdown.clone(), v)),
        link: link.clone(),
        mounted: Default::default(),
        neighbours,
        session: config.session.clone(),
    });
    let decided = link.clone();

    // These run for the session's life: one ending is fatal, said by name.
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        dns::serve(dns_udp, dns_tcp, config.dns).await;
        "the DNS server"
    });
    let to_wg = wg.clone();
    tasks.spawn(async move {
        tun_to_wg(tun, to_wg).await;
        "the tunnel device's reader"
    });
    let timers = wg.clone();
    tasks.spawn(async move {
        timers.run_timers().await;
        "the WireGuard timers"
    });
    tasks.spawn(async move {
        control.run().await;
        "the control connection"
    });
    // Its one job done, it ends: not one of the above.
    let mtu_task = tokio::spawn(async move {
        if mtu != names::STREAM_TUNNEL_MTU
            && decided.decided().await == Carrier::Stream
            && let Err(e) = grow.set_mtu(names::STREAM_TUNNEL_MTU)
        {
            tracing::warn!("keeping the tunnel MTU at {}: {e}", names::TUNNEL_MTU);
        }
    });
    let result = tokio::select! {
        result = transport::run(config.transport, hello_at, config.udp_fallback, wg, link) => result,
        Some(ended) = tasks.join_next() => match ended {
            Ok(task) => Err(anyhow::anyhow!("{task} stopped")),
            Err(e) => Err(anyhow::anyhow!("a task of the sidecar failed ({e})")),
        },
    };
    mtu_task.abort();
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
