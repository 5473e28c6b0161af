//! `cargo xtask bench soak [--minutes N]`: one `tpd run --swap` session on a
//! fresh sandbox carrying a steady 50 requests/s each way for N minutes
//! (default 30): a client pod calls the swapped Service (served by the local
//! container) and the local container calls another Service. Prints the
//! requests and errors each way, and the resident memory of the sidecar and
//! the agent after warm-up and at the end. Printed, never asserted.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, swap_record};

use crate::bench::Figure;

/// The local app: answers `local-app` on port 8080.
const LOCAL_APP: &str = "mkdir -p /w && echo local-app > /w/index.html && cd /w && exec python3 -m http.server 8080";

/// Calls URL at RATE per second for SECONDS, one request at a time on a new
/// connection each; prints `ok errors`.
const LOAD: &str = r#"
import sys, time, urllib.request
url, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ok = err = n = 0
start = time.time()
while time.time() - start < seconds:
    n += 1
    try:
        urllib.request.urlopen(url, timeout=5).read()
        ok += 1
    except Exception:
        err += 1
    delay = start + n / rate - time.time()
    if delay > 0:
        time.sleep(delay)
print(ok, err)
"#;

const RATE: u32 = 50;
/// How often resident memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);

pub fn run(minutes: u64) -> Result<Vec<Figure>> {
    images::ensure()?;
    session::require_tpd_images()?;
    let sb = Sandbox::up()?;
    session::deploy_echo(&sb, "hello")?;
    session::deploy_echo(&sb, "world")?;
    sb.kubectl_ok(&["run", "client", "--image", images::DEBIAN, "--restart=Never", "--", "sleep", "infinity"])?;
    let mut cleanup = Cleanup::default();
    let args = ["run", "--image", images::DEBIAN, "--swap", "deployment/hello", "--port", "8080:8080", "--"];
    let child = session::tpd(&sb)?.args(args).args(["sh", "-c", LOCAL_APP]).stdout(Stdio::null()).spawn()?;
    cleanup.children.push(child);
    let (d, _) =
        session::wait_deployment(&sb, "default", "hello", Duration::from_secs(120), |d| swap_record(d).is_some())?;
    let id = swap_record(&d).and_then(|r| r["session"].as_str().map(str::to_owned)).context("the session id")?;
    cleanup.sessions.push(id.clone());
    wait_served(&sb)?;

    let seconds = (minutes * 60).to_string();
    let rate = RATE.to_string();
    let load = |cmd: &mut Command, url: &str| -> Result<Child> {
        Ok(cmd.args(["python3", "-c", LOAD, url, &seconds, &rate]).stdout(Stdio::piped()).spawn()?)
    };
    eprintln!("soak: {RATE} requests/s each way for {minutes} min");
    let inbound = load(sb.kubectl().args(["exec", "client", "--"]), "http://hello/")?;
    let outbound = load(Command::new("docker").args(["exec", &format!("tpd-{id}")]), "http://world/")?;
    let memory = sample_memory(&sb, &id, Duration::from_secs(minutes * 60))?;
    let (inbound, outbound) = (counts(inbound)?, counts(outbound)?);
    if let Some(tpd) = cleanup.children.pop() {
        session::interrupt(tpd)?;
    }
    let mut figures = vec![
        Figure::new("soak: inbound requests", inbound.0 as f64, "requests"),
        Figure::new("soak: inbound errors", inbound.1 as f64, "errors"),
        Figure::new("soak: outbound requests", outbound.0 as f64, "requests"),
        Figure::new("soak: outbound errors", outbound.1 as f64, "errors"),
    ];
    for (who, (warm, end)) in [("sidecar", memory.sidecar), ("agent", memory.agent)] {
        figures.push(Figure::new(format!("soak: {who} RSS at the end"), end, "MiB").against("after warm-up", warm));
    }
    Ok(figures)
}

/// Waits until the client pod's request is answered by the local app.
fn wait_served(sb: &Sandbox) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        super::go_on()?;
        let out = sb.kubectl().args(["exec", "client", "--", "curl", "-s", "-m", "2", "http://hello/"]).output()?;
        if String::from_utf8_lossy(&out.stdout).contains("local-app") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the local app did not answer the client pod within 90 s")
}

/// `ok errors` as a load run printed them.
fn counts(child: Child) -> Result<(u64, u64)> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut numbers = text.split_whitespace().map(str::parse::<u64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(ok)), Some(Ok(errors))) => Ok((ok, errors)),
        _ => bail!("the load run printed {text:?} ({})", out.status),
    }
}

/// Resident memory (MiB) of the sidecar and the agent: `(after warm-up, at the end)`.
struct Memory {
    sidecar: (f64, f64),
    agent: (f64, f64),
}

/// Samples both processes until `duration` has passed; warm-up is the
/// first tenth of the run (at least one sample in).
fn sample_memory(sb: &Sandbox, id: &str, duration: Duration) -> Result<Memory> {
    let sidecar = container_pid(&format!("tpd-sidecar-{id}"))?;
    let agent = container_pid(&agent_container(sb, id)?)?;
    let started = Instant::now();
    let mut warm = None;
    loop {
        super::go_on()?;
        let now = (rss_mib(sidecar)?, rss_mib(agent)?);
        if warm.is_none() && started.elapsed() >= duration / 10 {
            warm = Some(now);
        }
        if started.elapsed() >= duration {
            let warm = warm.unwrap_or(now);
            return Ok(Memory { sidecar: (warm.0, now.0), agent: (warm.1, now.1) });
        }
        std::thread::sleep(SAMPLE_EVERY.min(duration.saturating_sub(started.elapsed())));
    }
}

/// The Docker container the sandbox runs the session's agent in.
fn agent_container(sb: &Sandbox, id: &str) -> Result<String> {
    let selector = format!("{}={id}", tpd_wire::names::LABEL_SESSION);
    let pod = sb.kubectl_ok(&["get", "pods", "-l", &selector, "-o", "jsonpath={.items[0].metadata.name}"])?;
    // The agent keeps the swapped container's name: find it by its image.
    let filter = format!("label=dev.tpd.sandbox.pod-name={}", pod.trim());
    let out = Command::new("docker").args(["ps", "--filter", &filter, "--format", "{{.ID}} {{.Image}}"]).output()?;
    let found = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.split_once(' ').filter(|(_, image)| image.starts_with(tpd_wire::names::AGENT_IMAGE_REPO)))
        .map(|(id, _)| id.to_owned());
    found.with_context(|| format!("no agent container in the pod {pod}"))
}

fn container_pid(container: &str) -> Result<u32> {
    let out = Command::new("docker").args(["inspect", "-f", "{{.State.Pid}}", container]).output()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| format!("the pid of {container}"))
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .with_context(|| format!("VmRSS of pid {pid}"))?;
    Ok(kib / 1024.0)
}
