//! Figures of the sandbox's node, as kubectl sees them: pod create ->
//! Running, and a 3-replica Deployment rollout. Each includes the kubectl
//! process start-ups, so the kubectl round trip is the baseline.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use tpd_e2e::sandbox::Sandbox;

use super::Figure;

const PODS: usize = 5;
const IMAGE: &str = "tpd-test/echo:latest";

/// Measures the node of a running sandbox instance.
/// Needs the test images (`cargo run -p tpd-e2e --bin tpd-test-images`).
pub fn figures(sb: &Sandbox) -> Result<Vec<Figure>> {
    measure(&sb.kubeconfig)
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new("kubectl").args(args).env("KUBECONFIG", kubeconfig).output().context("running kubectl")?;
    if !out.status.success() {
        bail!("kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(kubeconfig: &Path) -> Result<Vec<Figure>> {
    kubectl(kubeconfig, &["wait", "--for=condition=Ready", "node/sandbox-node", "--timeout=30s"])?;
    let mut round_trips: Vec<Duration> = (0..PODS)
        .map(|_| timed(|| kubectl(kubeconfig, &["get", "namespace", "default"]).map(drop)))
        .collect::<Result<_>>()?;
    round_trips.sort();
    let round_trip = ms(round_trips[PODS / 2]);

    let mut pods = Vec::with_capacity(PODS);
    for i in 0..PODS {
        let pod = format!("bench-{i}");
        pods.push(timed(|| {
            kubectl(kubeconfig, &["run", &pod, &format!("--image={IMAGE}")])?;
            let running = "--for=jsonpath={.status.phase}=Running";
            kubectl(kubeconfig, &["wait", running, &format!("pod/{pod}"), "--timeout=30s"]).map(drop)
        })?);
    }
    pods.sort();
    let rollout = timed(|| {
        kubectl(kubeconfig, &["create", "deployment", "bench", &format!("--image={IMAGE}"), "--replicas=3"])?;
        kubectl(kubeconfig, &["rollout", "status", "deployment/bench", "--timeout=60s"]).map(drop)
    })?;
    let baseline = "kubectl round trip (get namespace)";
    Ok(vec![
        Figure::new("sandbox pod create -> Running p50", ms(pods[PODS / 2]), "ms").against(baseline, round_trip),
        Figure::new("sandbox pod create -> Running max", ms(pods[PODS - 1]), "ms").against(baseline, round_trip),
        Figure::new("sandbox rollout of 3 replicas", ms(rollout), "ms").against(baseline, round_trip),
    ])
}
