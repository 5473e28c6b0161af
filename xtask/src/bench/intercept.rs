//! `cargo xtask bench intercept`: personal intercepts on a fresh sandbox,
//! timed from the outside with the real binary and images. Printed, never
//! asserted.
//!
//! - Time from `tpd run --intercept` to the first matching request served
//!   locally: for the first intercept of a workload (the agent is rolled
//!   out into its pods) and for a second one (the agent is already there).
//!   The clients are pods that keep calling the Service with the header,
//!   started before tpd so their own start-up is not counted.
//! - What the agent adds to requests it passes to the real container:
//!   latency (p50, p99) of sequential keep-alive requests from a pod
//!   straight to a pod's agent port, against the same requests straight to
//!   the app's port of the same pod, in the same run; and requests per
//!   second through one agent against the app alone (the client is Python
//!   in a pod on the same two cores, so the ratio is the figure to read).
//! - The same latency for gRPC unary calls on one channel (HTTP/2, routed
//!   per stream), through the agent of an intercepted gRPC Deployment
//!   against straight to the server's port.
//! - What a mirror (`--mirror`, every request copied to a developer's app)
//!   adds to the real requests: their latency and requests per second
//!   through the agent with and without the mirror, in the same run; and
//!   of the copies of that burst, how many the mirror's app answered and
//!   how many were dropped, as `tpd status` reports them.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tpd_e2e::home::Home;
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup};

use crate::bench::Figure;

const NS: &str = "bench";
const SERVE: &str = "mkdir -p /srv && echo served-locally > /srv/index.html && exec busybox httpd -f -p 9000 -h /srv";

/// A pod that asks `http://api/` with `x-dev: NAME` every 50 ms and logs
/// each answer stamped with its clock (the host's) in ms.
fn client(name: &str) -> String {
    format!(
        "end=$(( $(date +%s) + 300 )); while [ $(date +%s) -lt $end ]; do \
         r=$(curl -s -m 2 -H 'x-dev: {name}' http://api/ | head -c 40); echo \"$(date +%s%3N) $r\"; sleep 0.05; done"
    )
}

/// Sequential keep-alive requests: p50 and p99 in ms.
const LATENCY: &str = r#"
import http.client, json, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = http.client.HTTPConnection(host, port, timeout=5)
lat = []
for i in range(n):
    t = time.perf_counter()
    c.request("GET", "/")
    c.getresponse().read()
    lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"p50": lat[n // 2] * 1000, "p99": lat[int(n * 0.99)] * 1000}))
"#;

/// Sequential unary gRPC calls on one channel: p50 and p99 in ms.
const GRPC_LATENCY: &str = r#"
import grpc, json, sys, time
host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
unary = grpc.insecure_channel("%s:%s" % (host, port)).unary_unary("/echo.Echo/Unary")
unary(b"warm", timeout=5)
lat = []
for i in range(n):
    t = time.perf_counter()
    unary(b"hi", timeout=5)
    lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"p50": lat[n // 2] * 1000, "p99": lat[int(n * 0.99)] * 1000}))
"#;

/// Two processes, each with one keep-alive connection, for `argv[3]` seconds: requests per second.
const THROUGHPUT: &str = r#"
import http.client, json, multiprocessing, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def worker(q):
    c = http.client.HTTPConnection(host, port, timeout=5)
    end, n = time.time() + seconds, 0
    while time.time() < end:
        c.request("GET", "/")
        c.getresponse().read()
        n += 1
    q.put(n)
q = multiprocessing.Queue()
ps = [multiprocessing.Process(target=worker, args=(q,)) for _ in range(2)]
[p.start() for p in ps]
[p.join() for p in ps]
print(json.dumps({"rps": sum(q.get() for _ in ps) / seconds}))
"#;

pub fn run() -> Result<Vec<Figure>> {
    images::ensure()?;
    session::require_tpd_images()?;
    let sb = Sandbox::up()?;
    sb.apply(&tpd_e2e::intercept::workload(NS, 2))?;
    sb.rolled_out(NS, "api")?;
    let mut cleanup = Cleanup::default();
    let mut homes = Vec::new();
    let mut figures = Vec::new();
    for (name, which) in [("alice", "first intercept of a workload"), ("bob", "second intercept, agent in place")] {
        super::go_on()?;
        let home = Home::new()?;
        let took = first_served(&sb, &mut cleanup, &home, name)?;
        homes.push(home);
        figures.push(Figure::new(
            format!("intercept: tpd run to first matching request served locally ({which})"),
            took.as_secs_f64(),
            "s",
        ));
    }
    super::go_on()?;
    figures.extend(through_the_agent(&sb)?);
    super::go_on()?;
    figures.extend(mirror_costs(&sb, &mut cleanup)?);
    super::go_on()?;
    figures.extend(grpc_through_the_agent(&sb, &mut cleanup)?);
    drop(cleanup);
    Ok(figures)
}

/// Starts an intercept with header `x-dev: name` and returns how long until
/// a pod's request with that header was first answered locally.
fn first_served(sb: &Sandbox, cleanup: &mut Cleanup, home: &Home, name: &str) -> Result<Duration> {
    let pod = format!("client-{name}");
    sb.kubectl_ok(&[
        "run",
        &pod,
        "-n",
        NS,
        "--image",
        images::DEBIAN,
        "--restart=Never",
        "--",
        "sh",
        "-c",
        &client(name),
    ])?;
    sb.kubectl_ok(&["wait", "-n", NS, "--for=condition=Ready", &format!("pod/{pod}"), "--timeout=60s"])?;
    let dev = format!("tpd-bench-{name}-{}", std::process::id());
    let header = format!("x-dev={name}");
    // Resolving the binary may run `cargo build`: never inside the clock.
    let mut tpd = session::tpd_in(sb, home)?;
    let started_ms = epoch_ms();
    let started = Instant::now();
    let child = tpd
        .args(["run", "-n", NS, "--image", images::DEBIAN, "--name", &dev])
        .args(["--intercept", "deployment/api", "--port", "8080:9000", "--header", &header])
        .args(["--", "sh", "-c", SERVE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tpd")?;
    cleanup.children.push(child);
    let served_ms = loop {
        let log = sb.kubectl_ok(&["logs", "-n", NS, &pod]).unwrap_or_default();
        let served = log.lines().filter_map(|l| l.split_once(' ')).find(|(_, body)| body.trim() == "served-locally");
        if let Some(ms) = served.and_then(|(ms, _)| ms.parse::<u128>().ok()) {
            break ms;
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("no request with x-dev: {name} was served locally within 180 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = sb.kubectl_ok(&["delete", "pod", &pod, "-n", NS, "--wait=false"]);
    Ok(Duration::from_millis(u64::try_from(served_ms.saturating_sub(started_ms)).unwrap_or(0)))
}

/// The first pod of `app`: its IP and the agent's port standing for `remote`.
fn agent_of(sb: &Sandbox, app: &str, remote: u16) -> Result<(String, String)> {
    let label = format!("app={app}");
    let pod: Value = serde_json::from_str(&sb.kubectl_ok(&["get", "pods", "-n", NS, "-l", &label, "-o", "json"])?)?;
    let pod = &pod["items"][0];
    let ip = pod["status"]["podIP"].as_str().context("the pod's IP")?.to_owned();
    let agent_port = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .find(|p| p["name"] == tpd_wire::intercept::listen_port_name(remote).as_str())
        .and_then(|p| p["containerPort"].as_u64())
        .context("the pod has no intercept agent port")?
        .to_string();
    Ok((ip, agent_port))
}

/// Runs `script IP PORT ARG` in a pod; its last line, as JSON.
fn from_a_pod(sb: &Sandbox, name: &str, script: &str, ip: &str, port: &str, arg: &str) -> Result<Value> {
    let (phase, logs) = session::run_pod(sb, name, images::DEBIAN, &["python3", "-c", script, ip, port, arg])?;
    if phase != "Succeeded" {
        bail!("{name}: {logs}");
    }
    Ok(serde_json::from_str(logs.lines().last().unwrap_or_default())?)
}

fn ms(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_default()
}

/// Latency and throughput straight to one pod's agent port against its app port.
fn through_the_agent(sb: &Sandbox) -> Result<Vec<Figure>> {
    let (ip, agent_port) = agent_of(sb, "api", 8080)?;
    let direct = from_a_pod(sb, "latency-direct", LATENCY, &ip, "8080", "2000")?;
    let agent = from_a_pod(sb, "latency-agent", LATENCY, &ip, &agent_port, "2000")?;
    let direct_rps = from_a_pod(sb, "rps-direct", THROUGHPUT, &ip, "8080", "5")?;
    let agent_rps = from_a_pod(sb, "rps-agent", THROUGHPUT, &ip, &agent_port, "5")?;
    Ok(vec![
        Figure::new("intercept: request through the agent to the app, p50", ms(&agent, "p50"), "ms")
            .against("straight to the app's port", ms(&direct, "p50")),
        Figure::new("intercept: request through the agent to the app, p99", ms(&agent, "p99"), "ms")
            .against("straight to the app's port", ms(&direct, "p99")),
        Figure::new("intercept: requests/s through one agent", ms(&agent_rps, "rps"), "req/s")
            .against("straight to the app's port", ms(&direct_rps, "rps")),
    ])
}

/// The real requests' latency and rate through one agent without and with
/// a mirror of every request, and the fate of the copies.
fn mirror_costs(sb: &Sandbox, cleanup: &mut Cleanup) -> Result<Vec<Figure>> {
    let (ip, agent_port) = agent_of(sb, "api", 8080)?;
    let plain = from_a_pod(sb, "latency-no-mirror", LATENCY, &ip, &agent_port, "2000")?;
    let plain_rps = from_a_pod(sb, "rps-no-mirror", THROUGHPUT, &ip, &agent_port, "5")?;
    let home = Home::new()?;
    let run = ["--intercept", "deployment/api", "--port", "8080:9000", "--mirror", "--", "sh", "-c", SERVE];
    start_session(sb, cleanup, &home, "mirror", &run)?;
    // Every agent registers the session within a second or two of the home's.
    std::thread::sleep(Duration::from_secs(3));
    let mirrored = from_a_pod(sb, "latency-mirror", LATENCY, &ip, &agent_port, "2000")?;
    let mirrored_rps = from_a_pod(sb, "rps-mirror", THROUGHPUT, &ip, &agent_port, "5")?;
    let sent = 2000.0 + ms(&mirrored_rps, "rps") * 5.0;
    let (answered, dropped) = copies_counted(sb, sent)?;
    Ok(vec![
        Figure::new("intercept: request through the agent, mirrored, p50", ms(&mirrored, "p50"), "ms")
            .against("the same agent, no mirror", ms(&plain, "p50")),
        Figure::new("intercept: request through the agent, mirrored, p99", ms(&mirrored, "p99"), "ms")
            .against("the same agent, no mirror", ms(&plain, "p99")),
        Figure::new("intercept: requests/s through one agent, mirrored", ms(&mirrored_rps, "rps"), "req/s")
            .against("the same agent, no mirror", ms(&plain_rps, "rps")),
        Figure::new("intercept: copies of that burst answered by the mirror's app", answered, "copies")
            .against("requests sent", sent),
        Figure::new("intercept: copies of that burst dropped", dropped, "copies").against("requests sent", sent),
    ])
}

/// The mirroring session's copies answered and dropped, once `tpd status`
/// accounts for `sent` of them or stops changing (its figures are written
/// at each renewal, every 5 s).
fn copies_counted(sb: &Sandbox, sent: f64) -> Result<(f64, f64)> {
    let started = Instant::now();
    let mut last = (0.0, 0.0);
    loop {
        let intercepts = tpd_e2e::intercept::listed(sb, NS)?;
        let mirror = intercepts.iter().find(|i| i["mirror"] == true);
        let now = mirror.map_or((0.0, 0.0), |m| (ms(m, "mirrored"), ms(m, "dropped")));
        let settled = now == last && now.0 > 0.0;
        if now.0 + now.1 >= sent || settled || started.elapsed() > Duration::from_secs(60) {
            return Ok(now);
        }
        last = now;
        std::thread::sleep(Duration::from_secs(6));
    }
}

/// gRPC unary latency through the agent of an intercepted gRPC Deployment
/// against straight to the server's port of the same pod.
fn grpc_through_the_agent(sb: &Sandbox, cleanup: &mut Cleanup) -> Result<Vec<Figure>> {
    sb.apply(&tpd_e2e::intercept::grpc_workload(NS))?;
    sb.rolled_out(NS, "grpc")?;
    let home = Home::new()?;
    let intercept = ["--intercept", "deployment/grpc", "--port", "50051:50051", "--header", "x-dev=bench"];
    let serve = ["--", "python3", "-c", tpd_e2e::intercept::GRPC_SERVER, "bench", "127.0.0.1:50051"];
    start_session(sb, cleanup, &home, "grpc", &[&intercept[..], &serve[..]].concat())?;
    let (ip, agent_port) = agent_of(sb, "grpc", 50051)?;
    let direct = from_a_pod(sb, "grpc-direct", GRPC_LATENCY, &ip, "50051", "1000")?;
    let agent = from_a_pod(sb, "grpc-agent", GRPC_LATENCY, &ip, &agent_port, "1000")?;
    Ok(vec![
        Figure::new("intercept: gRPC unary call through the agent, p50", ms(&agent, "p50"), "ms")
            .against("straight to the server's port", ms(&direct, "p50")),
        Figure::new("intercept: gRPC unary call through the agent, p99", ms(&agent, "p99"), "ms")
            .against("straight to the server's port", ms(&direct, "p99")),
    ])
}

/// Starts `tpd run -n NS --image DEBIAN --name tpd-bench-WHAT-PID ARGS`
/// from `home` and waits until its local container runs.
fn start_session(sb: &Sandbox, cleanup: &mut Cleanup, home: &Home, what: &str, args: &[&str]) -> Result<()> {
    let dev = format!("tpd-bench-{what}-{}", std::process::id());
    let child = session::tpd_in(sb, home)?
        .args(["run", "-n", NS, "--image", images::DEBIAN, "--name", &dev])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tpd")?;
    cleanup.children.push(child);
    let started = Instant::now();
    while !session::docker_exec(&dev, "true").0 {
        if started.elapsed() > Duration::from_secs(180) {
            bail!("the {what} session did not start within 180 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn epoch_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}
