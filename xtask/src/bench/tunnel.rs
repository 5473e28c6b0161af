//! `cargo xtask bench tunnel`: the data plane with real containers (the
//! e2e fixture `tpd_e2e::dataplane::Lab`), against TCP over veth between
//! network namespaces (a container on the cluster network, no tunnel) and
//! two userspace WireGuard implementations between two network namespaces
//! this harness creates: boringtun-cli (the library tpd uses, behind a
//! kernel TUN) and wireguard-go. Same run, same client and server (a small
//! Python program, so every path is measured with the same tool).
//!
//! What a tunnel adds to the round trip is read against the path it runs
//! over, with the same client: tpd against the container on the cluster
//! network, boringtun-cli against plain TCP over the veth between its two
//! namespaces (the host's Python there, Debian's in the containers).
//! Round trips are sampled on every path in turn, in rounds, so the
//! machine's drift over a run does not favour whichever path came first.
//!
//! Needs root, Docker, the tpd and test images. wireguard-go and
//! wireguard-tools come from apt-get and boringtun-cli from `cargo install`
//! when missing (a baseline that cannot be had is skipped with a note).
//! Traffic stays inside the containers and namespaces made here.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tpd_e2e::dataplane::{Lab, Via, docker};

use super::Figure;

/// Port of the benchmark server.
const PORT: u16 = 5201;
const SINGLE_MIB: u64 = 256;
const MULTI_MIB_EACH: u64 = 96;
/// Keep-alive requests per path, sent in [`HTTP_ROUNDS`] rounds that take
/// every path in turn.
const HTTP_REQUESTS: u32 = 1000;
const HTTP_ROUNDS: u32 = 5;
const NEW_CONNECTIONS: u32 = 500;
const DNS_QUERIES: u32 = 100;

/// Client and server of every measurement.
const PROBE: &str = r#"
import socket, sys, time, threading
mode = sys.argv[1]
def serve(port):
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(('0.0.0.0', port)); srv.listen(512)
    buf = b'\0' * 262144
    def handle(c):
        try:
            head = b''
            while len(head) < 16:
                b = c.recv(16 - len(head))
                if not b: return
                head += b
            if head[:1] == b'd':
                left = int(head[1:])
                while left > 0: left -= c.send(buf[:min(left, len(buf))])
            elif head[:1] == b'e':
                c.sendall(head)
            elif head[:1] == b'h':
                f = c.makefile('rb')
                while True:
                    line = f.readline()
                    if not line: return
                    c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok')
        finally:
            c.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def down(host, port, mib, streams):
    n = mib * 1048576
    def one():
        s = socket.create_connection((host, port)); s.sendall(b'd' + str(n).encode().rjust(15))
        got = 0
        while got < n:
            b = s.recv(1048576)
            if not b: raise SystemExit('short read')
            got += len(b)
        s.close()
    ts = [threading.Thread(target=one) for _ in range(streams)]
    t = time.time(); [x.start() for x in ts]; [x.join() for x in ts]
    print(n * streams * 8 / (time.time() - t) / 1e6)
def http(host, port, count):
    s = socket.create_connection((host, port)); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b'h' + b' ' * 15)
    f = s.makefile('rb'); lat = []
    for _ in range(count):
        t = time.perf_counter(); s.sendall(b'GET / HTTP/1.1\r\n')
        while f.readline().strip(): pass
        f.read(2); lat.append((time.perf_counter() - t) * 1000)
    print(' '.join('%.4f' % x for x in lat))
def conns(host, port, count):
    t = time.time()
    for _ in range(count):
        s = socket.create_connection((host, port)); s.sendall(b'e' + b' ' * 15); s.recv(16); s.close()
    print(count / (time.time() - t))
def dns(name, count):
    lat = []
    for _ in range(count):
        t = time.perf_counter(); socket.getaddrinfo(name, 80, socket.AF_INET); lat.append((time.perf_counter() - t) * 1000)
    lat.sort(); print(lat[len(lat) // 2])
a = sys.argv[2:]
if mode == 'serve': serve(int(a[0]))
elif mode == 'down': down(a[0], int(a[1]), int(a[2]), int(a[3]))
elif mode == 'http': http(a[0], int(a[1]), int(a[2]))
elif mode == 'conns': conns(a[0], int(a[1]), int(a[2]))
elif mode == 'dns': dns(a[0], int(a[1]))
"#;

/// Where a client runs: `argv` prefix that runs `python3 -c PROBE args…` there.
type Runner = dyn Fn(&[String]) -> Result<String>;

fn in_container(container: String) -> Box<Runner> {
    Box::new(move |args: &[String]| {
        let mut all = vec!["exec", container.as_str(), "timeout", "120", "python3", "-c", PROBE];
        all.extend(args.iter().map(String::as_str));
        docker(&all)
    })
}

fn numbers(out: &str) -> Result<Vec<f64>> {
    out.split_whitespace().map(|v| v.parse::<f64>().with_context(|| format!("probe printed {out:?}"))).collect()
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
    let single = numbers(&run(&a(&["down", server, &port, &SINGLE_MIB.to_string(), "1"]))?)?[0];
    let multi = numbers(&run(&a(&["down", server, &port, &MULTI_MIB_EACH.to_string(), "4"]))?)?[0];
    let conns = numbers(&run(&a(&["conns", server, &port, &NEW_CONNECTIONS.to_string()]))?)?[0];
    Ok(Bulk { single, multi, conns })
}

/// Keep-alive round trips of one path.
#[derive(Debug, Clone, Copy)]
struct Rtt {
    p50: f64,
    p99: f64,
}

/// One path to the probe server: where its client runs and the server's address.
struct Route<'a> {
    run: &'a Runner,
    server: &'a str,
}

/// Round trips of every path, sampled in turn: a round of requests on each
/// path, [`HTTP_ROUNDS`] times, so a change in the machine's state (another
/// process waking, a frequency step) shifts all paths alike instead of
/// whichever was measured at the time.
fn interleaved_rtts(routes: &[Route]) -> Result<Vec<Rtt>> {
    let per_round = (HTTP_REQUESTS / HTTP_ROUNDS).to_string();
    let port = PORT.to_string();
    let mut samples = vec![Vec::new(); routes.len()];
    for _ in 0..HTTP_ROUNDS {
        for (route, samples) in routes.iter().zip(&mut samples) {
            let args = ["http", route.server, &port, &per_round].map(String::from);
            samples.extend(numbers(&(route.run)(&args)?)?);
        }
    }
    Ok(samples
        .iter_mut()
        .map(|s| {
            s.sort_by(f64::total_cmp);
            Rtt { p50: percentile(s, 0.5), p99: percentile(s, 0.99) }
        })
        .collect())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// A path tpd is compared with, kept up for the whole run.
struct Baseline {
    name: &'static str,
    run: Box<Runner>,
    server: String,
    bulk: Bulk,
}

pub fn run() -> Result<Vec<Figure>> {
    // The userspace WireGuard pairs stay up for the whole run, so their
    // round trips can be sampled in turn with tpd's.
    let mut pairs = Vec::new();
    for which in [Userspace::Boringtun, Userspace::WireguardGo] {
        match UserspaceWg::start(which) {
            Ok(wg) => pairs.push((which, wg)),
            Err(e) => eprintln!("{} baseline skipped: {e:#}", which.name()),
        }
    }
    let mut baselines = Vec::new();
    if let Some((_, wg)) = pairs.first() {
        eprintln!("measuring TCP over the netns veth…");
        let bulk = bulk(&*wg.runner(), VETH_SERVER_IP)?;
        baselines.push(Baseline { name: NETNS_VETH, run: wg.runner(), server: VETH_SERVER_IP.into(), bulk });
    }
    for (which, wg) in &pairs {
        eprintln!("measuring {} between netns…", which.name());
        let bulk = bulk(&*wg.runner(), &wg.server_ip)?;
        baselines.push(Baseline { name: which.baseline(), run: wg.runner(), server: wg.server_ip.clone(), bulk });
    }

    let mut figures = Vec::new();
    for (via, label) in [(Via::StreamTcp, "stream"), (Via::Udp, "udp")] {
        let mut lab = Lab::start()?;
        let server = lab.run_on_cluster(
            "bench-server",
            tpd_e2e::images::DEBIAN,
            &["python3", "-c", PROBE, "serve", &PORT.to_string()],
        )?;
        let server_ip =
            docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &server])?;
        lab.start_sidecar(&via)?;
        std::thread::sleep(Duration::from_secs(2));
        let (sidecar_rss, agent_rss) = (Lab::rss_kib(&lab.sidecar)?, Lab::rss_kib(&lab.agent)?);
        let direct = lab.run_on_cluster("bench-direct", tpd_e2e::images::DEBIAN, &["sleep", "infinity"])?;
        let (tpd_run, direct_run) = (in_container(lab.dev.clone()), in_container(direct.clone()));

        eprintln!("measuring tpd ({label} transport) and TCP over veth…");
        let tpd = bulk(&*tpd_run, &server_ip)?;
        let veth = bulk(&*direct_run, &server_ip)?;
        let mut routes =
            vec![Route { run: &*tpd_run, server: &server_ip }, Route { run: &*direct_run, server: &server_ip }];
        routes.extend(baselines.iter().map(|b| Route { run: &*b.run, server: &b.server }));
        let rtts = interleaved_rtts(&routes)?;
        // Absolute (trailing dot): the search list would add lookups that
        // Docker's DNS on an internal network never answers.
        let fqdn = format!("{}.", tpd_e2e::dataplane::echo_fqdn());
        let dns_tpd = numbers(&tpd_run(&["dns".into(), fqdn.clone(), DNS_QUERIES.to_string()])?)?[0];
        let dns_direct = numbers(&direct_run(&["dns".into(), fqdn, DNS_QUERIES.to_string()])?)?[0];

        // Each compared path: its name, bulk figures and round trips (`rtts`
        // holds tpd's first, then the paths in this order).
        let compared: Vec<(&str, &Bulk, Rtt)> = [(DOCKER_VETH, &veth)]
            .into_iter()
            .chain(baselines.iter().map(|b| (b.name, &b.bulk)))
            .zip(rtts.iter().skip(1))
            .map(|((name, bulk), rtt)| (name, bulk, *rtt))
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
        let p50_of = |name: &str| compared.iter().find(|(n, ..)| *n == name).map(|(_, _, r)| r.p50);
        if let (Some(veth), Some(plain), Some(bt)) =
            (p50_of(DOCKER_VETH), p50_of(NETNS_VETH), p50_of(Userspace::Boringtun.baseline()))
        {
            figures.push(
                Figure::new(format!("http p50 added to its path (tpd {label})"), rtts[0].p50 - veth, "ms")
                    .against("added by boringtun-cli", bt - plain),
            );
        }
        figures.push(
            Figure::new(format!("dns query p50 (cluster name) (tpd {label})"), dns_tpd, "ms")
                .against(DOCKER_VETH, dns_direct),
        );
        figures.push(Figure::new(format!("sidecar RSS idle (tpd {label})"), sidecar_rss as f64 / 1024.0, "MiB"));
        figures.push(Figure::new(format!("agent RSS idle (tpd {label})"), agent_rss as f64 / 1024.0, "MiB"));
    }
    Ok(figures)
}

/// TCP from a container on the cluster network to the server, no tunnel.
const DOCKER_VETH: &str = "TCP over veth (no tunnel)";
/// Plain TCP between the two namespaces of a userspace WireGuard baseline.
const NETNS_VETH: &str = "TCP over netns veth (no tunnel)";
/// The server's veth address in the far namespace (its tunnel address is 10.77.1.2).
const VETH_SERVER_IP: &str = "10.77.0.2";

/// A userspace WireGuard implementation the harness runs as a baseline.
#[derive(Debug, Clone, Copy)]
enum Userspace {
    /// boringtun-cli, the same WireGuard library tpd uses, behind a kernel TUN.
    Boringtun,
    /// wireguard-go, the reference userspace implementation.
    WireguardGo,
}

impl Userspace {
    fn name(self) -> &'static str {
        match self {
            Userspace::Boringtun => "boringtun-cli",
            Userspace::WireguardGo => "wireguard-go",
        }
    }

    /// Short, for interface names (at most 15 bytes in all).
    fn tag(self) -> &'static str {
        match self {
            Userspace::Boringtun => "bt",
            Userspace::WireguardGo => "go",
        }
    }

    fn baseline(self) -> &'static str {
        match self {
            Userspace::Boringtun => "boringtun-cli between netns",
            Userspace::WireguardGo => "wireguard-go between netns",
        }
    }

    /// The command that creates interface `iface` and serves its UAPI socket
    /// (both daemonize once the interface exists), installing the program
    /// when missing.
    fn command(self, iface: &str) -> Result<String> {
        if sh("command -v wg").is_err() {
            eprintln!("installing wireguard-tools for the baselines…");
            sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wireguard-tools")?;
        }
        match self {
            Userspace::WireguardGo => {
                if sh("command -v wireguard-go").is_err() {
                    eprintln!("installing wireguard-go for the baseline…");
                    sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wireguard-go")?;
                }
                Ok(format!("env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go {iface}"))
            }
            Userspace::Boringtun => {
                let bin = boringtun_cli()?;
                Ok(format!("{} --disable-drop-privileges {iface}", bin.display()))
            }
        }
    }
}

/// boringtun-cli from PATH, or built once with `cargo install` into the
/// user's cache (Debian does not package it).
fn boringtun_cli() -> Result<std::path::PathBuf> {
    if let Ok(path) = sh("command -v boringtun-cli") {
        return Ok(path.into());
    }
    let root = tpd_e2e::sandbox::cache_dir().join("tpd-bench");
    let bin = root.join("bin/boringtun-cli");
    if !bin.exists() {
        eprintln!("building boringtun-cli for the baseline (cargo install, once)…");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--quiet", "--locked", "boringtun-cli", "--root"])
            .arg(&root)
            .status()?;
        if !status.success() {
            bail!("cargo install boringtun-cli failed ({status})");
        }
    }
    Ok(bin)
}

/// Two network namespaces joined by a veth pair, with a userspace
/// WireGuard tunnel between them and the probe server on the far side.
struct UserspaceWg {
    id: String,
    ns: [String; 2],
    server_ip: String,
    server: Child,
}

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").args(["-c", cmd]).output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl UserspaceWg {
    fn start(which: Userspace) -> Result<UserspaceWg> {
        // Names carry the implementation: each leaves a UAPI socket named
        // after its interface, and the two run one after the other.
        let id = format!("{}{}", which.tag(), std::process::id());
        let start = [which.command(&format!("tpdwga{id}"))?, which.command(&format!("tpdwgb{id}"))?];
        let ns = [format!("tpdbench-a-{id}"), format!("tpdbench-b-{id}")];
        let server = Command::new("true").spawn()?;
        let mut this = UserspaceWg { id: id.clone(), ns: ns.clone(), server_ip: "10.77.1.2".into(), server };
        let keys: Vec<(String, String)> = (0..2)
            .map(|_| {
                let private = sh("wg genkey")?;
                let public = sh(&format!("echo {private} | wg pubkey"))?;
                Ok((private, public))
            })
            .collect::<Result<_>>()?;
        for n in &ns {
            sh(&format!("ip netns add {n}"))?;
        }
        sh(&format!("ip link add tpdb-a{id} netns {} type veth peer name tpdb-b{id} netns {}", ns[0], ns[1]))?;
        for (i, n) in ns.iter().enumerate() {
            let side = if i == 0 { 'a' } else { 'b' };
            let other = 1 - i;
            let key_file = format!("/tmp/tpdbench-{id}-{i}.key");
            std::fs::write(&key_file, &keys[i].0)?;
            // One UAPI socket per interface name in /var/run/wireguard: names must differ.
            let up = sh(&format!(
                "ip -n {n} link set lo up && ip -n {n} addr add 10.77.0.{a}/24 dev tpdb-{side}{id} && ip -n {n} link set tpdb-{side}{id} up && \
                 ip netns exec {n} {start} 2>/dev/null && \
                 ip netns exec {n} wg set {wg} private-key {key_file} listen-port 51820 peer {peer} allowed-ips 10.77.1.{pa}/32 endpoint 10.77.0.{pa}:51820 && \
                 ip -n {n} addr add 10.77.1.{a}/24 dev {wg} && ip -n {n} link set {wg} mtu 1420 up",
                a = i + 1,
                pa = other + 1,
                peer = keys[other].1,
                wg = format!("tpdwg{side}{id}"),
                start = start[i],
            ));
            // The private key file goes whether or not the setup worked.
            let _ = std::fs::remove_file(&key_file);
            up?;
        }
        this.server = Command::new("ip")
            .args(["netns", "exec", &ns[1], "python3", "-c", PROBE, "serve", &PORT.to_string()])
            .stdout(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(this)
    }

    fn runner(&self) -> Box<Runner> {
        let ns = self.ns[0].clone();
        Box::new(move |args: &[String]| {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "timeout", "120", "python3", "-c", PROBE])
                .args(args)
                .output()?;
            if !out.status.success() {
                bail!("probe in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
    }
}

impl Drop for UserspaceWg {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        for n in &self.ns {
            // Killing what runs in the namespace ends the WireGuard daemon; deleting it, the veth pair.
            let _ = Command::new("sh")
                .args(["-c", &format!("ip netns pids {n} | xargs -r kill; ip netns del {n}")])
                .output();
        }
        for side in ['a', 'b'] {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/tpdwg{side}{}.sock", self.id));
        }
    }
}
