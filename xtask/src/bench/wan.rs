//! `cargo xtask bench wan [--rtt MS] [--loss PCT] [--rate MBIT]`: the WAN
//! lab of issue #22: its emulated link ([`tpd_wanlink`]: two network
//! namespaces, a userspace relay with delay, loss and a rate limit), plain
//! TCP over it, the link's own limit, and tpd's tunnel over the same link
//! with both transports ([`tunnel`]), read against it.
//!
//! For each profile (by default the three: 20 ms; 50 ms with 0.5%
//! loss per packet; 80 ms at 100 Mbit/s), a fresh link and:
//! - the link as measured: UDP round trips from the laptop side to the
//!   cluster side, p50 and p99 against the RTT asked, and the share of
//!   them lost against `1 - (1 - loss)²` (a round trip is two packets);
//! - with the tunnel benchmark's probe (`probe.py`), the client on the
//!   laptop side and the server on the cluster side: one TCP stream's
//!   throughput (64 MiB, or what came in 20 s), against the rate where one
//!   is set, with the relay's CPU time meanwhile (share of a core, and per
//!   packet forwarded); keep-alive request round
//!   trips (p50, p99) against the link's; and a new connection's first
//!   response (connect + request) against two of the link's round trips;
//! - the same three through tpd's tunnel, the port-forward transport and
//!   UDP, each in a data-plane lab whose sidecar reaches the agent only
//!   over the link, against plain TCP over the link between the same
//!   client and server containers (measured in the first lab), with the
//!   issue's targets for the round trips and DNS through the sidecar
//!   (cached, and uncached: across the tunnel); and boringtun-cli and
//!   wireguard-go as cluster gateways over the link beside the UDP transport.
//!
//! With `--volumes`, the volume workloads instead ([`volumes`]): tpd's
//! volume bridge across the link against sshfs over it.
//!
//! Needs root, /dev/net/tun, iproute2, iptables and python3 for the link,
//! and Docker with the tpd and test images for the tunnel; no cluster.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tpd_wanlink::{Echo, Link, Side, Spec};

use super::Figure;
use super::probe::{PROBE, figure, numbers, percentile};
use tpd_e2e::dataplane::Via;

mod tunnel;
mod volumes;

/// The probe server's port on the cluster side.
const PORT: u16 = 5201;
/// UDP round trips that measure the link, one per [`ECHO_INTERVAL`].
const ECHO_COUNT: u32 = 5000;
const ECHO_INTERVAL: Duration = Duration::from_millis(1);
/// One stream's download: this much, or what came in [`STREAM_SECONDS`].
const STREAM_MIB: u64 = 64;
const STREAM_SECONDS: u64 = 20;
const HTTP_REQUESTS: u32 = 600;
const NEW_CONNECTIONS: u32 = 200;

/// `--rtt`, `--loss`, `--rate`: one profile of the link instead of the
/// default ones; `--volumes`: the volume workloads over it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Flags {
    /// `bench wan`: round-trip time of the emulated link [default: 20];
    /// `bench session`: of the API server [default: 0, 20, 50 and 80].
    #[arg(long, value_name = "MS")]
    rtt: Option<f64>,
    /// `bench wan`: packets lost in each direction, in percent [default: 0].
    #[arg(long, value_name = "PCT")]
    loss: Option<f64>,
    /// `bench wan`: rate of each direction [default: no limit but the relay's].
    #[arg(long, value_name = "MBIT")]
    rate: Option<f64>,
    /// `bench wan`: measure the volume workloads (tpd's volume bridge
    /// against sshfs over the same link) instead of the tunnel's figures.
    /// Long: sshfs pays a round trip per file (minutes per profile).
    #[arg(long)]
    volumes: bool,
    /// `bench wan --volumes`: only the workloads whose name contains this
    /// (e.g. `find`, `npm`).
    #[arg(long, value_name = "TEXT", requires = "volumes")]
    only: Option<String>,
}

impl Flags {
    pub fn given(&self) -> bool {
        self.rtt.is_some() || self.loss.is_some() || self.rate.is_some() || self.volumes
    }

    /// Whether the profiles were chosen (else the defaults run).
    fn profile_given(&self) -> bool {
        self.rtt.is_some() || self.loss.is_some() || self.rate.is_some()
    }

    /// `--loss`, `--rate` or `--volumes`: what only `bench wan` takes.
    pub fn only_for_the_link(&self) -> bool {
        self.loss.is_some() || self.rate.is_some() || self.volumes
    }

    /// `--rtt`, which `bench session` also takes (the API server's RTT).
    pub fn rtt(&self) -> Option<f64> {
        self.rtt
    }

    /// The profiles to measure: the flags' one, or the defaults.
    fn profiles(&self) -> Result<Vec<Spec>> {
        let ms = Duration::from_millis;
        if !self.profile_given() {
            return Ok(vec![
                Spec { rtt: ms(20), loss: 0.0, rate_mbit: None },
                Spec { rtt: ms(50), loss: 0.005, rate_mbit: None },
                Spec { rtt: ms(80), loss: 0.0, rate_mbit: Some(100.0) },
            ]);
        }
        let rtt = self.rtt.unwrap_or(20.0);
        if !(rtt.is_finite() && (0.0..=10_000.0).contains(&rtt)) {
            bail!("--rtt {rtt}: give the round trip in milliseconds, 0 to 10000");
        }
        let loss = self.loss.unwrap_or(0.0);
        if !(0.0..100.0).contains(&loss) {
            bail!("--loss {loss}: give a percentage, at least 0 and below 100");
        }
        Ok(vec![Spec { rtt: Duration::from_secs_f64(rtt / 1e3), loss: loss / 100.0, rate_mbit: self.rate }])
    }
}

pub fn run(flags: &Flags) -> Result<Vec<Figure>> {
    if flags.volumes {
        return volumes::run(&flags.profiles()?, flags.only.as_deref());
    }
    let mut figures = Vec::new();
    for spec in flags.profiles()? {
        super::go_on()?;
        eprintln!("measuring plain TCP over the emulated link ({spec}), netns to netns…");
        figures.extend(profile(spec)?);
    }
    Ok(figures)
}

fn profile(spec: Spec) -> Result<Vec<Figure>> {
    let link = Link::up(spec).context("bringing the emulated link up (needs root and /dev/net/tun)")?;
    // Declared after the link: it stops before the namespaces go.
    let server = Server::start(&link)?;
    let echo = link.echo(ECHO_COUNT, ECHO_INTERVAL)?;
    let (Some(rtt_p50), Some(rtt_p99)) = (echo.percentile(0.5), echo.percentile(0.99)) else {
        bail!("no UDP round trip over the link came back ({} sent)", echo.sent)
    };
    let (rtt_p50, rtt_p99) = (millis(rtt_p50), millis(rtt_p99));

    super::go_on()?;
    let (cpu_before, packets_before, started) = (link.relay_cpu(), packets(&link), Instant::now());
    let stream = figure(&probe(&link, "down", &[STREAM_MIB.to_string(), "1".into(), STREAM_SECONDS.to_string()])?)?;
    let (elapsed, packets) = (started.elapsed(), packets(&link) - packets_before);
    let relay_cpu = link.relay_cpu().zip(cpu_before).map(|(after, before)| after.saturating_sub(before));
    super::go_on()?;
    let http = sorted(&probe(&link, "http", &[HTTP_REQUESTS.to_string()])?)?;
    super::go_on()?;
    let first = sorted(&probe(&link, "first", &[NEW_CONNECTIONS.to_string()])?)?;
    report(&link, &echo);

    let asked_ms = millis(spec.rtt);
    let at = |name: &str| format!("{name} [{spec}]");
    let mut figures = vec![
        Figure::new(at("link rtt p50"), rtt_p50, "ms").against("asked", asked_ms),
        Figure::new(at("link rtt p99"), rtt_p99, "ms").against("asked", asked_ms),
        Figure::new(at("link round trips lost"), echo.loss() * 100.0, "%")
            .against("asked: 1 - (1 - loss)^2", spec.round_trip_loss() * 100.0),
    ];
    let tcp = Figure::new(at("tcp 1 stream"), stream, "Mbit/s");
    figures.push(match spec.rate_mbit {
        Some(rate) => tcp.against("link rate", rate),
        None => tcp,
    });
    if let Some(cpu) = relay_cpu {
        let share = cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0;
        figures.push(Figure::new(at("relay cpu during the stream"), share, "% core"));
        let per_packet = cpu.as_secs_f64() * 1e6 / packets.max(1) as f64;
        figures.push(Figure::new(at("relay cpu per packet"), per_packet, "us"));
    }
    figures.extend([
        Figure::new(at("http keep-alive p50"), percentile(&http, 0.5), "ms").against("link rtt p50", rtt_p50),
        Figure::new(at("http keep-alive p99"), percentile(&http, 0.99), "ms").against("link rtt p99", rtt_p99),
        Figure::new(at("connect + first response p50"), percentile(&first, 0.5), "ms")
            .against("2 x link rtt p50", 2.0 * rtt_p50),
    ]);
    drop(server);
    let plain = tunnel::Path { stream, http, first };

    // tpd over the same link, each transport in a lab of its own; plain
    // TCP between containers over the link in the first, boringtun-cli as
    // gateways in the UDP one.
    let wan = tunnel::Wan::new(&link)?;
    let mut direct = None;
    for (via, label) in [(Via::StreamTcp, "port-forward"), (Via::Udp, "udp")] {
        let udp = matches!(via, Via::Udp);
        let before = link.counters();
        let measured = tunnel::tpd(&wan, &via, label, udp, direct.is_none())?;
        report_lost(&link, before);
        if let Some(path) = measured.direct {
            figures.extend(tunnel::against(&at, DIRECT, &path, PLAIN, &plain));
            direct = Some(path);
        }
        let name = format!("tpd {label}");
        let mut paths = vec![(&measured.tpd, name.clone())];
        paths.extend(measured.gateways.iter().map(|(which, g)| (g, which.as_gateway().to_string())));
        // Against the same client and server without the tunnel.
        let (baseline, plain) = match &direct {
            Some(direct) => (DIRECT, direct),
            None => (PLAIN, &plain),
        };
        for (path, name) in paths {
            figures.extend(tunnel::against(&at, &name, path, baseline, plain));
        }
        let p50 = |v: &[f64]| percentile(v, 0.5);
        figures.extend([
            Figure::new(at(&format!("{name}: http keep-alive p50")), p50(&measured.tpd.http), "ms")
                .against("target: link rtt p50 + 0.3 ms", rtt_p50 + 0.3),
            Figure::new(at(&format!("{name}: connect + first response p50")), p50(&measured.tpd.first), "ms")
                .against("target: 2 x link rtt p50 + 0.5 ms", 2.0 * rtt_p50 + 0.5),
            Figure::new(at(&format!("{name}: dns p50, cached cluster name")), measured.dns_cached.p50, "ms")
                .against("target", 0.1),
            Figure::new(at(&format!("{name}: dns p50, uncached cluster name")), measured.dns_uncached.p50, "ms")
                .against("target: link rtt p50 + 0.3 ms", rtt_p50 + 0.3),
        ]);
        for (which, dns) in [("cached", &measured.dns_cached), ("uncached", &measured.dns_uncached)] {
            let failed = format!("{name}: dns {which} queries failed (of {})", super::tunnel::DNS_QUERIES);
            figures.push(Figure::new(at(&failed), dns.failed, "queries"));
        }
        for (which, gateway) in &measured.gateways {
            figures.push(
                Figure::new(at(&format!("{name}: tcp 1 stream")), measured.tpd.stream, "Mbit/s")
                    .against(which.as_gateway(), gateway.stream),
            );
        }
    }
    Ok(figures)
}

/// The baselines without a tunnel: between the link's namespaces (the
/// host's Python), and from a container joined to the link to the lab's
/// cluster network (tpd's client and server).
const PLAIN: &str = "plain TCP over the link, netns";
const DIRECT: &str = "plain TCP over the link, containers";

/// What the relay did to the packets of the last measurements, on stderr.
fn report_lost(link: &Link, before: tpd_wanlink::Counters) {
    let now = link.counters();
    let (out, back) = (now.laptop_to_cluster, now.cluster_to_laptop);
    let (out0, back0) = (before.laptop_to_cluster, before.cluster_to_laptop);
    eprintln!(
        "  link: forwarded {}/{} packets (to cluster/back), lost {}/{}, queue drops {}/{}",
        out.forwarded - out0.forwarded,
        back.forwarded - back0.forwarded,
        out.lost - out0.lost,
        back.lost - back0.lost,
        out.queue_drops - out0.queue_drops,
        back.queue_drops - back0.queue_drops,
    );
}

/// Packets the relay forwarded, both ways.
fn packets(link: &Link) -> u64 {
    let c = link.counters();
    c.laptop_to_cluster.forwarded + c.cluster_to_laptop.forwarded
}

/// What the relay did, on stderr beside the progress lines, with the TCP
/// congestion control both sides use (a new namespace takes the host's).
fn report(link: &Link, echo: &Echo) {
    let c = link.counters();
    let (out, back) = (c.laptop_to_cluster, c.cluster_to_laptop);
    let cc = link
        .enter(Side::Cluster, || std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control"))
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    eprintln!(
        "  link: {} of {} UDP round trips; relay forwarded {}/{} packets (to cluster/back), lost {}/{}, \
         queue drops {}/{}, handed over > {:?} late {}/{} (latest {:?}); TCP congestion control {}",
        echo.received(),
        echo.sent,
        out.forwarded,
        back.forwarded,
        out.lost,
        back.lost,
        out.queue_drops,
        back.queue_drops,
        tpd_wanlink::LATE,
        out.late,
        back.late,
        out.max_late.max(back.max_late),
        cc.trim(),
    );
}

/// The probe server on the cluster side; stopped when dropped.
struct Server(Child);

impl Server {
    fn start(link: &Link) -> Result<Server> {
        let child = link
            .command(Side::Cluster, "python3")
            .args(["-c", PROBE, "serve", &PORT.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("starting the probe server (python3) on the cluster side")?;
        let server = Server(child);
        // Asked from its own side, so that the link's loss cannot delay it.
        let addr = SocketAddr::from((Side::Cluster.addr(), PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = link.enter(Side::Cluster, || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))?;
            match up {
                Ok(_) => return Ok(server),
                Err(e) if Instant::now() > deadline => bail!("the probe server did not listen on {addr}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the probe's client `mode` on the laptop side against the server;
/// returns what it printed. Bounded by a timeout that grows with the RTT.
fn probe(link: &Link, mode: &str, args: &[String]) -> Result<String> {
    let server = Side::Cluster.addr().to_string();
    let round_trips = f64::from(HTTP_REQUESTS.max(2 * NEW_CONNECTIONS));
    let timeout = 60 + STREAM_SECONDS + (round_trips * link.spec().rtt.as_secs_f64() * 3.0) as u64;
    // `--foreground` keeps the probe in our process group, so Ctrl-C ends
    // it with us instead of leaving it to its timeout.
    let out = link
        .command(Side::Laptop, "timeout")
        .args(["--foreground", &timeout.to_string(), "python3", "-c", PROBE, mode, &server, &PORT.to_string()])
        .args(args)
        .output()
        .context("running the probe (python3) on the laptop side")?;
    if !out.status.success() {
        bail!("probe {mode} on the laptop side ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn sorted(out: &str) -> Result<Vec<f64>> {
    let mut values = numbers(out)?;
    if values.is_empty() {
        bail!("probe printed no samples");
    }
    values.sort_by(f64::total_cmp);
    Ok(values)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
