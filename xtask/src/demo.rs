//! `cargo xtask demo`: the main job end to end on the sandbox cluster.
//!
//! Builds what it needs, starts a sandbox cluster, deploys `hello` and
//! `world` (echo servers behind Services), then runs
//! `tpd run --swap deployment/hello` with a local Debian container serving
//! files on port 9000. It shows a pod in the cluster calling `hello` and
//! getting the local container's answer, the local container calling `world`
//! by its cluster DNS name, and, after Ctrl-C, the Deployment restored and
//! the echo answering again. The sandbox is torn down on every exit path.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, deployment_json, run_pod, swap_record, user_owned, wait_deployment};

const DEV: &str = "tpd-demo-dev";
const LOCAL_PAGE: &str = "served by the container on your laptop";

pub fn run(root: &Path) -> Result<()> {
    step("building tpd, its images and the demo's images");
    crate::prereqs::ensure()?;
    crate::images::build(root, tpd_wire::VERSION)?;
    images::ensure()?;
    session::binary()?;

    step("starting a sandbox cluster (a Kubernetes API whose pods are Docker containers)");
    let sb = Sandbox::up()?;
    println!("    kubeconfig: {}", sb.kubeconfig.display());
    for app in ["hello", "world"] {
        sb.kubectl_ok(&["create", "deployment", app, "--image", images::ECHO, "--port", "8080"])?;
        sb.kubectl_ok(&["expose", "deployment", app, "--port", "80", "--target-port", "8080"])?;
    }
    for app in ["hello", "world"] {
        sb.kubectl_ok(&["rollout", "status", &format!("deployment/{app}"), "--timeout", "90s"])?;
    }
    show(&sb.kubectl_ok(&["get", "deployments,services"])?);
    let original = user_owned(deployment_json(&sb, "default", "hello")?);
    let (_, before) = run_pod(&sb, "client-before", images::DEBIAN, &["curl", "-s", "http://hello"])?;
    step("a pod in the cluster calls http://hello before the swap");
    show(&before);

    step("tpd run --image tpd-test/debian --swap deployment/hello --port 8080:9000 -- python3 -m http.server 9000");
    let serve = format!(
        "mkdir -p /srv && echo '{LOCAL_PAGE}' > /srv/index.html && cd /srv && exec python3 -m http.server 9000"
    );
    let swap_args = [
        "run",
        "--image",
        images::DEBIAN,
        "--name",
        DEV,
        "--swap",
        "deployment/hello",
        "--port",
        "8080:9000",
        "--",
        "sh",
        "-c",
        &serve,
    ];
    let mut session =
        Session(Some(session::tpd(&sb)?.args(swap_args).stdout(Stdio::inherit()).stderr(Stdio::inherit()).spawn()?));
    wait_for_dev_container(&mut session)?;

    step("the local container calls the cluster service `world` by its DNS name");
    show(&docker_exec(&["curl", "-s", "http://world.default.svc.cluster.local"])?);
    step("a pod in the cluster calls http://hello: the local container answers");
    let (_, during) = run_pod(&sb, "client-during", images::DEBIAN, &["curl", "-s", "http://hello"])?;
    show(&during);
    if during.trim() != LOCAL_PAGE {
        bail!("the cluster's request to hello was not served locally: {during:?}");
    }

    step("Ctrl-C: tpd restores the Deployment and removes its containers");
    session.interrupt()?;
    let (restored, took) =
        wait_deployment(&sb, "default", "hello", Duration::from_secs(30), |d| swap_record(d).is_none())?;
    if user_owned(restored) != original {
        bail!("deployment/hello differs from the original after the restore");
    }
    println!("    restored in {took:.1?}; deployment/hello equals the original");
    sb.kubectl_ok(&["rollout", "status", "deployment/hello", "--timeout", "90s"])?;
    let (_, after) = run_pod(&sb, "client-after", images::DEBIAN, &["curl", "-s", "http://hello"])?;
    step("a pod in the cluster calls http://hello after the session");
    show(&after);
    step("done: tearing the sandbox cluster down");
    Ok(())
}

/// The `tpd run` process; interrupted (as Ctrl-C would) on every exit path.
struct Session(Option<Child>);

impl Session {
    fn interrupt(&mut self) -> Result<()> {
        let Some(mut child) = self.0.take() else {
            return Ok(());
        };
        Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("tpd did not stop within 30 s of Ctrl-C");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn exited(&mut self) -> Result<bool> {
        Ok(self.0.as_mut().map(|c| c.try_wait()).transpose()?.flatten().is_some())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = self.interrupt() {
            eprintln!("warning: {e:#}");
        }
    }
}

fn wait_for_dev_container(session: &mut Session) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while docker_exec(&["true"]).is_err() {
        if session.exited()? {
            bail!("tpd run ended before the local container started (see its output above)");
        }
        if Instant::now() > deadline {
            bail!("the local container did not start within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn docker_exec(cmd: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(["exec", DEV]).args(cmd).output().context("running docker exec")?;
    if !out.status.success() {
        bail!("docker exec {DEV} {} failed: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn show(text: &str) {
    for line in text.trim_end().lines() {
        println!("    {line}");
    }
}
