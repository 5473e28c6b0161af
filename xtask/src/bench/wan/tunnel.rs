//! tpd's tunnel over the emulated link, both transports, and boringtun-cli
//! and wireguard-go as cluster gateways over the same link: the data-plane lab
//! ([`Lab`]) with the link put on the path between its laptop side and its
//! cluster side.
//!
//! Each container that must reach the other side gets a veth pair into the
//! link's namespace of its side ([`Wan::attach`]), and nothing else routes
//! between them: the link's laptop namespace forwards between its veths
//! and the link's device, the cluster namespace likewise. So:
//!
//! ```text
//!  sidecar + developer's container ── veth ── laptop ns ══ link ══ cluster ns ── veth ── agent ── cluster network ── server
//!  (a namespace with no other network)       10.79.1.0/24 ◀─ routed ─▶ 10.79.2.0/24
//! ```
//!
//! The sidecar runs in the namespace of a container with no network but
//! loopback ([`Lab::start_netns_owner`]), and its transport goes to the
//! agent's address on its veth: for the port-forward transport the framed
//! TCP stream to the lab's forwarder onto the agent's loopback (in a
//! cluster it crosses the API server and the kubelet; here the link), for
//! UDP the datagrams themselves (and the hello's TCP stream before them).
//! Either way every packet of the tunnel meets the link's delay, loss and
//! rate, and the connections inside the tunnel meet them through it.
//!
//! The gateway baselines are `bench tunnel`'s ([`Gateway`]), each client on
//! the laptop network and its gateway on the cluster network as there,
//! their WireGuard datagrams over veths into the link instead of the
//! laptop network.

use std::cell::Cell;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tpd_e2e::dataplane::{Lab, SidecarNet, Via, docker, echo_fqdn};
use tpd_wanlink::{Link, Side};

use super::{HTTP_REQUESTS, NEW_CONNECTIONS, PORT, STREAM_MIB, STREAM_SECONDS, sorted};
use crate::bench::Figure;
use crate::bench::probe::{figure, lab_with_server, percentile};
use crate::bench::tunnel::wireguard::{Gateway, Userspace};
use crate::bench::tunnel::{DNS_QUERIES, Runner, SIDECAR_DNS, in_container, uncached_name};

/// What one path gave: one stream (Mbit/s), keep-alive round trips and new
/// connections' first responses (ms, sorted).
pub struct Path {
    pub stream: f64,
    pub http: Vec<f64>,
    pub first: Vec<f64>,
}

/// The probe's three measurements from `run` to the server at `server`.
pub fn measure(run: &Runner, server: &str) -> Result<Path> {
    let port = PORT.to_string();
    let args = |mode: &str, rest: &[String]| -> Vec<String> {
        [mode, server, &port].iter().map(|s| s.to_string()).chain(rest.iter().cloned()).collect()
    };
    crate::bench::go_on()?;
    let down = [STREAM_MIB.to_string(), "1".into(), STREAM_SECONDS.to_string()];
    let stream = figure(&run(&args("down", &down))?)?;
    crate::bench::go_on()?;
    let http = sorted(&run(&args("http", &[HTTP_REQUESTS.to_string()]))?)?;
    crate::bench::go_on()?;
    let first = sorted(&run(&args("first", &[NEW_CONNECTIONS.to_string()]))?)?;
    Ok(Path { stream, http, first })
}

/// The link, and containers joined to its sides so far.
pub struct Wan<'l> {
    link: &'l Link,
    /// Attachments made so far, for the names and addresses of the next.
    made: Cell<u8>,
}

/// Each side's network behind the link: the laptop side's veths, the
/// cluster side's (each a /30 of it).
fn behind(side: Side) -> &'static str {
    match side {
        Side::Laptop => "10.79.1.0/24",
        Side::Cluster => "10.79.2.0/24",
    }
}

impl<'l> Wan<'l> {
    /// Makes both of the link's namespaces forward, each routing the
    /// network behind the other side into the link.
    pub fn new(link: &'l Link) -> Result<Wan<'l>> {
        for (side, other) in [(Side::Laptop, Side::Cluster), (Side::Cluster, Side::Laptop)] {
            run(link.command(side, "sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
            link.add_route(side, behind(other))?;
        }
        Ok(Wan { link, made: Cell::new(0) })
    }

    /// Joins `container`'s network namespace to `side` of the link by a
    /// veth pair (which goes with the container's namespace, or with the
    /// link's); returns the container's address on it, from which it
    /// reaches everything behind the link.
    pub fn attach(&self, side: Side, container: &str) -> Result<Ipv4Addr> {
        let n = self.made.get();
        if n >= 63 {
            bail!("no more than 63 containers can be joined to one link");
        }
        self.made.set(n + 1);
        let third = match side {
            Side::Laptop => 1,
            Side::Cluster => 2,
        };
        let (near, far) = (Ipv4Addr::new(10, 79, third, 4 * n + 1), Ipv4Addr::new(10, 79, third, 4 * n + 2));
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container])?;
        let (ns, dev) = (self.link.netns(side), format!("wl{n}"));
        run(std::process::Command::new("ip")
            .args(["-n", ns, "link", "add", &dev, "type", "veth", "peer", "name", VETH, "netns", &pid]))?;
        let ip = |args: &[&str]| run(std::process::Command::new("ip").args(["-n", ns]).args(args));
        ip(&["addr", "add", &format!("{near}/30"), "dev", &dev])?;
        ip(&["link", "set", &dev, "up"])?;
        let inside =
            |args: &[&str]| run(std::process::Command::new("nsenter").args(["-t", &pid, "-n", "ip"]).args(args));
        inside(&["addr", "add", &format!("{far}/30"), "dev", VETH])?;
        inside(&["link", "set", VETH, "up"])?;
        inside(&["route", "add", "10.79.0.0/16", "via", &near.to_string()])?;
        Ok(far)
    }
}

/// Plain TCP from a container joined to the laptop side to the server on
/// the lab's cluster network, no tunnel: the path tpd's figures take with
/// the same client and server (Debian's Python in containers, `docker
/// exec`), where the namespaces' own figures take the host's Python. A
/// router container on the cluster network, joined to the cluster side,
/// forwards and masquerades, as the gateway baseline's does.
pub fn direct(wan: &Wan, lab: &mut Lab, server: &str) -> Result<Path> {
    let sleeper = ["sleep", "infinity"];
    let router = lab.run_on_cluster("wan-router", tpd_e2e::images::DEBIAN, &sleeper)?;
    let router_ip = wan.attach(Side::Cluster, &router)?;
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &router])?;
    let nsenter = |args: &[&str]| run(std::process::Command::new("nsenter").args(["-t", &pid, "-n"]).args(args));
    nsenter(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    nsenter(&["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.79.0.0/16", "-j", "MASQUERADE"])
        .context("iptables (masquerade on the router)")?;
    let cluster = wan.link.netns(Side::Cluster);
    run(std::process::Command::new("ip").args([
        "-n",
        cluster,
        "route",
        "replace",
        &lab.cluster_subnet,
        "via",
        &router_ip.to_string(),
    ]))?;
    run(std::process::Command::new("ip").args([
        "-n",
        wan.link.netns(Side::Laptop),
        "route",
        "replace",
        &lab.cluster_subnet,
        "dev",
        tpd_wanlink::DEVICE,
    ]))?;
    let client = lab.start_netns_owner("wan-client")?;
    let client_ip = wan.attach(Side::Laptop, &client)?;
    let gateway = Ipv4Addr::from(u32::from(client_ip) - 1).to_string();
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &client])?;
    run(std::process::Command::new("nsenter").args([
        "-t",
        &pid,
        "-n",
        "ip",
        "route",
        "add",
        &lab.cluster_subnet,
        "via",
        &gateway,
    ]))?;
    eprintln!("measuring plain TCP over the emulated link ({}), containers to the cluster network…", wan.link.spec());
    measure(&*in_container(client), server)
}

/// The veth's name in a container joined to the link.
const VETH: &str = "tpdwan";

fn run(cmd: &mut std::process::Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The TCP congestion control a container's network namespace uses.
fn congestion_control(container: &str) -> String {
    let read = || -> Result<String> {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container])?;
        let out = std::process::Command::new("nsenter")
            .args(["-t", &pid, "-n", "cat", "/proc/sys/net/ipv4/tcp_congestion_control"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    read().unwrap_or_else(|e| format!("unknown ({e})"))
}

/// tpd over the link with `via`, and (`with_gateways`) boringtun-cli and
/// wireguard-go as gateways over it in the same lab.
pub struct Measured {
    pub tpd: Path,
    pub dns_cached: Dns,
    pub dns_uncached: Dns,
    /// Each userspace WireGuard gateway that started, with what it carried.
    pub gateways: Vec<(Userspace, Path)>,
    /// [`direct`], measured in the same lab.
    pub direct: Option<Path>,
}

pub fn tpd(wan: &Wan, via: &Via, label: &str, with_gateways: bool, with_direct: bool) -> Result<Measured> {
    crate::bench::go_on()?;
    let (mut lab, server_ip) = lab_with_server(PORT)?;
    // Cluster names Docker's DNS answers, each asked once through the tunnel (uncached).
    let names: Vec<String> = (0..DNS_QUERIES).map(|i| uncached_name(&i.to_string())).collect();
    lab.run_on_cluster_as("bench-names", &names, tpd_e2e::images::DEBIAN, &["sleep", "infinity"])?;
    let agent_ip = wan.attach(Side::Cluster, &lab.agent)?;
    let owner = lab.start_netns_owner("laptop")?;
    wan.attach(Side::Laptop, &owner)?;
    let at = SidecarNet { network: format!("container:{owner}"), agent_ip: agent_ip.to_string() };
    lab.start_sidecar_on(via, &at).with_context(|| format!("starting the sidecar ({label}) over the link"))?;
    std::thread::sleep(Duration::from_secs(2));
    let smoltcp = match via {
        Via::Udp => "Reno, window fitted to the sidecar's UDP buffer (at most 512 KiB)",
        _ => "none, send buffer 1 Gbit/s x handshake RTT within 1-8 MiB",
    };
    eprintln!(
        "  tpd {label}: TCP congestion control: developer's container {}, agent's sockets {}, agent's stack towards the sidecar {smoltcp}",
        congestion_control(&lab.dev),
        congestion_control(&lab.agent),
    );

    eprintln!("measuring tpd ({label} transport) over the emulated link ({})…", wan.link.spec());
    let run = in_container(lab.dev.clone());
    let tpd = measure(&*run, &server_ip)?;
    crate::bench::go_on()?;
    let (count, tolerate) = (DNS_QUERIES.to_string(), "tolerate".to_string());
    let uncached = ["dnseach".into(), SIDECAR_DNS.into(), uncached_name("{}"), count.clone(), tolerate.clone()];
    let dns_uncached = dns(&run(&uncached)?)?;
    let cached = ["dns".into(), SIDECAR_DNS.into(), echo_fqdn(), count, tolerate];
    let dns_cached = dns(&run(&cached)?)?;

    let direct = if with_direct { Some(direct(wan, &mut lab, &server_ip)?) } else { None };
    let mut gateways = Vec::new();
    for which in crate::bench::tunnel::USERSPACE.into_iter().filter(|_| with_gateways) {
        crate::bench::go_on()?;
        let started = Gateway::start_over(which, &mut lab, |_, client, gateway| {
            Ok([wan.attach(Side::Laptop, client)?.to_string(), wan.attach(Side::Cluster, gateway)?.to_string()])
        });
        match started {
            Ok(gw) => {
                eprintln!("measuring {} over the emulated link…", which.as_gateway());
                gateways.push((which, measure(&*gw.runner(), &server_ip)?));
            }
            Err(e) => eprintln!("{} baseline skipped: {e:#}", which.as_gateway()),
        }
    }
    Ok(Measured { tpd, dns_cached, dns_uncached, gateways, direct })
}

/// DNS through the sidecar: the p50 of the queries answered, and how many
/// of [`DNS_QUERIES`] were not (an error, or no answer in 5 s).
pub struct Dns {
    pub p50: f64,
    pub failed: f64,
}

fn dns(out: &str) -> Result<Dns> {
    match crate::bench::probe::numbers(out)?[..] {
        [p50, failed] => Ok(Dns { p50, failed }),
        _ => bail!("probe printed {out:?}, not a p50 and a count"),
    }
}

/// The figures of one path (`name`) against those of a path without a tunnel.
pub fn against(at: &dyn Fn(&str) -> String, name: &str, path: &Path, baseline: &str, plain: &Path) -> Vec<Figure> {
    let p50 = |v: &[f64]| percentile(v, 0.5);
    vec![
        Figure::new(at(&format!("{name}: tcp 1 stream")), path.stream, "Mbit/s").against(baseline, plain.stream),
        Figure::new(at(&format!("{name}: http keep-alive p50")), p50(&path.http), "ms")
            .against(baseline, p50(&plain.http)),
        Figure::new(at(&format!("{name}: http keep-alive p99")), percentile(&path.http, 0.99), "ms")
            .against(baseline, percentile(&plain.http, 0.99)),
        Figure::new(at(&format!("{name}: connect + first response p50")), p50(&path.first), "ms")
            .against(baseline, p50(&plain.first)),
    ]
}
