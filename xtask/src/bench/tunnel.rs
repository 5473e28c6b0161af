//! `cargo xtask bench tunnel`: the data plane with real containers (the
//! e2e fixture `tpd_e2e::dataplane::Lab`), against TCP over veth between
//! network namespaces (a container on the cluster network, no tunnel) and
//! two userspace WireGuard implementations, boringtun-cli (the library tpd
//! uses, behind a kernel TUN) and wireguard-go, each run two ways (see
//! [`wireguard`]): between two namespaces, the server at the tunnel's far
//! end, and as a gateway into the lab's cluster network, as Gefyra reaches
//! a cluster. Same run, same client and server (a small Python program, so
//! every path is measured with the same tool).
//!
//! What a tunnel adds to the round trip is read against the path it runs
//! over, with the same client: tpd and the gateways against the container
//! on the cluster network, the namespace pairs against plain TCP over the
//! veth between their namespaces (the host's Python there, Debian's in the
//! containers). Round trips are sampled on every path in turn, in rounds,
//! so the machine's drift over a run does not favour whichever path came
//! first. For each path through a tunnel, the CPU time both of its ends
//! spend per keep-alive request is read meanwhile ([`super::cpu`]): tpd's
//! agent and sidecar, each baseline's two daemons.
//!
//! DNS is timed the same way on both sides, with raw queries over UDP: in
//! the developer's container to tpd's resolver (the sidecar on 127.0.0.1,
//! answering a name again from its cache, or asking the agent through the
//! tunnel for a name it has not seen), on the cluster network to Docker's
//! DNS, the resolver the agent forwards to, so the difference is what tpd
//! adds. The targets printed beside them (issue
//! #19): a cached name in 0.1 ms, an uncached one within the keep-alive
//! round trip plus 0.1 ms.
//!
//! Needs root, Docker, the tpd and test images. wireguard-go and
//! wireguard-tools come from apt-get and boringtun-cli from `cargo install`
//! when missing (a baseline that cannot be had is skipped with a note).
//! Traffic stays inside the containers and namespaces made here.

pub(super) mod wireguard;

use std::time::Duration;

use anyhow::Result;
use tpd_e2e::dataplane::{Lab, Via};
use wireguard::{Gateway, NETNS_VETH, NetnsPair, Userspace, VETH_SERVER_IP};

use super::Figure;
use super::cpu::Processes;
use super::probe::{PROBE, figure, numbers, percentile};

/// Port of the benchmark server.
const PORT: u16 = 5201;
const SINGLE_MIB: u64 = 256;
const MULTI_MIB_EACH: u64 = 96;
/// Keep-alive requests per path, sent in [`HTTP_ROUNDS`] rounds that take
/// every path in turn.
const HTTP_REQUESTS: u32 = 3000;
const HTTP_ROUNDS: u32 = 10;
const NEW_CONNECTIONS: u32 = 500;
pub(super) const DNS_QUERIES: u32 = 100;

/// Where a client runs: `argv` prefix that runs `python3 -c PROBE args…` there.
pub(super) type Runner = dyn Fn(&[String]) -> Result<String>;

pub(super) fn in_container(container: String) -> Box<Runner> {
    Box::new(move |args: &[String]| {
        let out = std::process::Command::new("docker")
            .args(["exec", &container, "timeout", "120", "python3", "-c", PROBE])
            .args(args)
            .output()?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            anyhow::bail!("probe {} in {container} ({}): {}", args.join(" "), out.status, stderr.trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
}

/// Throughput (single, 4 streams) and new connections per second of one path.
struct Bulk {
    single: f64,
    multi: f64,
    conns: f64,
}

fn bulk(run: &Runner, server: &str) -> Result<Bulk> {
    let a = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
    let port = PORT.to_string();
    let single = figure(&run(&a(&["down", server, &port, &SINGLE_MIB.to_string(), "1"]))?)?;
    let multi = figure(&run(&a(&["down", server, &port, &MULTI_MIB_EACH.to_string(), "4"]))?)?;
    let conns = figure(&run(&a(&["conns", server, &port, &NEW_CONNECTIONS.to_string()]))?)?;
    Ok(Bulk { single, multi, conns })
}

/// Keep-alive round trips of one path.
#[derive(Debug, Clone, Copy)]
struct Rtt {
    p50: f64,
    p99: f64,
    /// CPU time both ends of the tunnel spent per request, in µs (paths
    /// without a tunnel have none).
    cpu_us: Option<f64>,
}

/// One path to the probe server: where its client runs, the server's
/// address, and the tunnel's two ends if it has any.
struct Route<'a> {
    run: &'a Runner,
    server: &'a str,
    ends: Option<&'a Processes>,
}

/// Round trips of every path, sampled in turn: a round of requests on each
/// path, [`HTTP_ROUNDS`] times, so a change in the machine's state (another
/// process waking, a frequency step) shifts all paths alike instead of
/// whichever was measured at the time.
fn interleaved_rtts(routes: &[Route]) -> Result<Vec<Rtt>> {
    let per_round = (HTTP_REQUESTS / HTTP_ROUNDS).to_string();
    let port = PORT.to_string();
    let mut samples = vec![Vec::new(); routes.len()];
    let mut cpu = vec![Duration::ZERO; routes.len()];
    for _ in 0..HTTP_ROUNDS {
        super::go_on()?;
        for ((route, samples), cpu) in routes.iter().zip(&mut samples).zip(&mut cpu) {
            let args = ["http", route.server, &port, &per_round].map(String::from);
            let ends = route.ends.cloned().unwrap_or_default();
            let (out, used) = ends.during(|| (route.run)(&args))?;
            samples.extend(numbers(&out)?);
            *cpu += used;
        }
    }
    Ok(samples
        .iter_mut()
        .zip(routes.iter().zip(cpu))
        .map(|(s, (route, cpu))| {
            let requests = s.len().max(1) as f64;
            s.sort_by(f64::total_cmp);
            let cpu_us = route.ends.map(|_| cpu.as_secs_f64() * 1e6 / requests);
            Rtt { p50: percentile(s, 0.5), p99: percentile(s, 0.99), cpu_us }
        })
        .collect())
}

/// A path tpd is compared with.
struct Baseline {
    name: &'static str,
    run: Box<Runner>,
    server: String,
    bulk: Bulk,
    /// The tunnel's two ends, for a path through a tunnel.
    ends: Option<Processes>,
}

impl Baseline {
    fn measure(name: &'static str, run: Box<Runner>, server: &str, ends: Option<Processes>) -> Result<Baseline> {
        super::go_on()?;
        eprintln!("measuring {name}…");
        let bulk = bulk(&*run, server)?;
        Ok(Baseline { name, run, server: server.into(), bulk, ends })
    }
}

pub const USERSPACE: [Userspace; 2] = [Userspace::Boringtun, Userspace::WireguardGo];

pub fn run() -> Result<Vec<Figure>> {
    // The namespace pairs stay up for the whole run, so their round trips
    // can be sampled in turn with tpd's.
    let mut pairs = Vec::new();
    for which in USERSPACE {
        match NetnsPair::start(which) {
            Ok(wg) => pairs.push((which, wg)),
            Err(e) => eprintln!("{} baseline skipped: {e:#}", which.between_netns()),
        }
    }
    let mut netns_baselines = Vec::new();
    if let Some((_, wg)) = pairs.first() {
        netns_baselines.push(Baseline::measure(NETNS_VETH, wg.runner(), VETH_SERVER_IP, None)?);
    }
    for (which, wg) in &pairs {
        netns_baselines.push(Baseline::measure(which.between_netns(), wg.runner(), &wg.server_ip, Some(wg.ends()))?);
    }

    let mut figures = Vec::new();
    for (via, label) in [(Via::StreamTcp, "stream"), (Via::Udp, "udp")] {
        super::go_on()?;
        let (mut lab, server_ip) = super::probe::lab_with_server(PORT)?;
        lab.start_sidecar(&via)?;
        std::thread::sleep(Duration::from_secs(2));
        let (sidecar_rss, agent_rss) = (Lab::rss_kib(&lab.sidecar)?, Lab::rss_kib(&lab.agent)?);
        let direct = lab.run_on_cluster("bench-direct", tpd_e2e::images::DEBIAN, &["sleep", "infinity"])?;
        // Cluster names Docker's DNS answers, each asked once through the tunnel (uncached).
        let names: Vec<String> = (0..DNS_QUERIES).map(|i| uncached_name(&i.to_string())).collect();
        lab.run_on_cluster_as("bench-names", &names, tpd_e2e::images::DEBIAN, &["sleep", "infinity"])?;
        // Declared after the lab, so its daemons stop before its containers go.
        let mut gateways = Vec::new();
        for which in USERSPACE {
            match Gateway::start(which, &mut lab) {
                Ok(gw) => gateways.push((which, gw)),
                Err(e) => eprintln!("{} baseline skipped: {e:#}", which.as_gateway()),
            }
        }
        let tpd_run = in_container(lab.dev.clone());

        super::go_on()?;
        eprintln!("measuring tpd ({label} transport)…");
        let tpd = bulk(&*tpd_run, &server_ip)?;
        // Each compared path; `rtts` holds tpd's first, then these in order.
        let mut baselines = vec![Baseline::measure(DOCKER_VETH, in_container(direct), &server_ip, None)?];
        for (which, gw) in &gateways {
            baselines.push(Baseline::measure(which.as_gateway(), gw.runner(), &server_ip, Some(gw.ends()))?);
        }
        let tpd_ends = Processes::containers(&[&lab.agent, &lab.sidecar])?;
        let mut routes = vec![Route { run: &*tpd_run, server: &server_ip, ends: Some(&tpd_ends) }];
        routes.extend(baselines.iter().chain(&netns_baselines).map(|b| Route {
            run: &*b.run,
            server: &b.server,
            ends: b.ends.as_ref(),
        }));
        let rtts = interleaved_rtts(&routes)?;
        let dns = dns_p50s(&*tpd_run, &*baselines[0].run)?;

        let compared: Vec<(&str, &Bulk, Rtt)> = baselines
            .iter()
            .chain(&netns_baselines)
            .zip(rtts.iter().skip(1))
            .map(|(b, rtt)| (b.name, &b.bulk, *rtt))
            .collect();
        let mut push = |name: &str, unit: &str, value: f64, of: &dyn Fn(&Bulk, Rtt) -> f64| {
            for (baseline, b, rtt) in &compared {
                figures.push(Figure::new(format!("{name} (tpd {label})"), value, unit).against(*baseline, of(b, *rtt)));
            }
        };
        push("throughput 1 stream", "Mbit/s", tpd.single, &|b, _| b.single);
        push("throughput 4 streams", "Mbit/s", tpd.multi, &|b, _| b.multi);
        push("http keep-alive p50", "ms", rtts[0].p50, &|_, r| r.p50);
        push("http keep-alive p99", "ms", rtts[0].p99, &|_, r| r.p99);
        push("new connections", "conn/s", tpd.conns, &|b, _| b.conns);
        figures.extend(added_p50(label, rtts[0].p50, &compared));
        for (baseline, _, rtt) in &compared {
            if let (Some(tpd), Some(theirs)) = (rtts[0].cpu_us, rtt.cpu_us) {
                let figure = Figure::new(format!("cpu per http request, both ends (tpd {label})"), tpd, "us");
                figures.push(figure.against(*baseline, theirs));
            }
        }
        let cached = format!("dns p50, cached cluster name (tpd {label})");
        figures.push(Figure::new(&cached, dns.tpd_cached, "ms").against(DOCKER_DNS, dns.direct_cached));
        figures.push(Figure::new(&cached, dns.tpd_cached, "ms").against("target", 0.1));
        let uncached = format!("dns p50, uncached cluster name (tpd {label})");
        figures.push(Figure::new(&uncached, dns.tpd_uncached, "ms").against(DOCKER_DNS, dns.direct_uncached));
        figures.push(
            Figure::new(&uncached, dns.tpd_uncached, "ms")
                .against("target: http keep-alive p50 + 0.1 ms", rtts[0].p50 + 0.1),
        );
        figures.push(Figure::new(format!("sidecar RSS idle (tpd {label})"), sidecar_rss as f64 / 1024.0, "MiB"));
        figures.push(Figure::new(format!("agent RSS idle (tpd {label})"), agent_rss as f64 / 1024.0, "MiB"));
    }
    Ok(figures)
}

/// The `i`th name of the container that holds [`DNS_QUERIES`] cluster names.
pub(super) fn uncached_name(i: &str) -> String {
    format!("n{i}.{}.svc.cluster.local", tpd_e2e::dataplane::NAMESPACE)
}

/// DNS round trips (p50, ms) of one cluster name asked again and again
/// (after a first query, so tpd answers from its cache) and of
/// [`DNS_QUERIES`] names asked once each (so each crosses the tunnel), by a
/// client of tpd's resolver (the sidecar) and by one of the resolver the
/// agent forwards to (Docker's DNS) on the cluster network.
struct DnsP50s {
    tpd_cached: f64,
    tpd_uncached: f64,
    direct_cached: f64,
    direct_uncached: f64,
}

fn dns_p50s(tpd: &Runner, direct: &Runner) -> Result<DnsP50s> {
    super::go_on()?;
    let (count, each) = (DNS_QUERIES.to_string(), uncached_name("{}"));
    let cached = |server: &str| ["dns".into(), server.into(), tpd_e2e::dataplane::echo_fqdn(), count.clone()];
    let uncached = |server: &str| ["dnseach".into(), server.into(), each.clone(), count.clone()];
    Ok(DnsP50s {
        tpd_uncached: figure(&tpd(&uncached(SIDECAR_DNS))?)?,
        tpd_cached: figure(&tpd(&cached(SIDECAR_DNS))?)?,
        direct_uncached: figure(&direct(&uncached(DOCKER_DNS_ADDR))?)?,
        direct_cached: figure(&direct(&cached(DOCKER_DNS_ADDR))?)?,
    })
}

/// tpd's resolver, the sidecar, which a session's resolv.conf names. The
/// lab's developer container has Docker's DNS in its resolv.conf instead
/// (`--dns` on a user-defined network), which forwards to the sidecar: a
/// hop of dockerd's that a session does not have (0.15-0.2 ms here).
pub(super) const SIDECAR_DNS: &str = "127.0.0.1";
/// Docker's DNS in a container on a user-defined network: the agent's
/// resolver in the lab.
const DOCKER_DNS_ADDR: &str = "127.0.0.11";

/// What each tunnel adds to the p50 of the path it runs over, tpd's against
/// boringtun-cli's two ways: between namespaces (its server at the
/// tunnel's end, the path is the veth) and as a cluster gateway (the same
/// networks as tpd's, the path is the container on the cluster network).
fn added_p50(label: &str, tpd_p50: f64, compared: &[(&str, &Bulk, Rtt)]) -> Vec<Figure> {
    let p50_of = |name: &str| compared.iter().find(|(n, ..)| *n == name).map(|(_, _, r)| r.p50);
    let tpd_added = p50_of(DOCKER_VETH).map(|veth| tpd_p50 - veth);
    let bt = Userspace::Boringtun;
    let bt_added = [
        (bt.between_netns(), p50_of(bt.between_netns()).zip(p50_of(NETNS_VETH)).map(|(t, path)| t - path)),
        (bt.as_gateway(), p50_of(bt.as_gateway()).zip(p50_of(DOCKER_VETH)).map(|(t, path)| t - path)),
    ];
    let Some(tpd_added) = tpd_added else { return Vec::new() };
    bt_added
        .into_iter()
        .filter_map(|(name, added)| {
            let figure = Figure::new(format!("http p50 added to its path (tpd {label})"), tpd_added, "ms");
            Some(figure.against(format!("added by {name}"), added?))
        })
        .collect()
}

/// TCP from a container on the cluster network to the server, no tunnel.
const DOCKER_VETH: &str = "TCP over veth (no tunnel)";
/// The agent's resolver (Docker's DNS) asked by a container on the cluster network.
const DOCKER_DNS: &str = "Docker's DNS from the cluster network (no tunnel)";
