//! Fixtures for driving the real `tpd` binary against a sandbox cluster:
//! building it, running it with the sandbox's kubeconfig, reading a
//! Deployment as kubectl users see it (minus the fields the API server
//! owns), and removing whatever a session left locally.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::home::Home;
use crate::images;
use crate::sandbox::Sandbox;

/// The annotation holding the swap record (tpd_wire::names::ANNOTATION_SWAP).
pub const SWAP_ANNOTATION: &str = tpd_wire::names::ANNOTATION_SWAP;

/// Builds `tpd` once per test process and returns its path; `TPD_BIN` overrides.
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    images::cargo_binary(&BIN, "tpd-cli", "tpd", "TPD_BIN")
}

/// The tpd images a session needs, built by `cargo xtask images`: this
/// version's, or `TPD_SIDECAR_IMAGE`/`TPD_AGENT_IMAGE`, which tpd itself
/// reads too (the tests do not clear them).
pub fn require_tpd_images() -> Result<()> {
    for image in [images::tpd_sidecar(), images::tpd_agent()] {
        let ok = Command::new("docker")
            .args(["image", "inspect", &image])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("the image {image} is missing: build it with `cargo xtask images`");
        }
    }
    Ok(())
}

/// What every session test needs before it takes the machine's sandbox:
/// the test images, tpd's images and the `tpd` binary (built here, out of
/// the test's timings).
pub fn prerequisites() -> Result<()> {
    images::ensure()?;
    require_tpd_images()?;
    binary().map(drop)
}

/// A `tpd` command aimed at the sandbox (its kubeconfig, namespace default),
/// in the sandbox's fresh home.
pub fn tpd(sb: &Sandbox) -> Result<Command> {
    tpd_in(sb, &sb.home)
}

/// A `tpd` command aimed at the sandbox, in `home`: a test that plays two
/// machines gives each its own.
pub fn tpd_in(sb: &Sandbox, home: &Home) -> Result<Command> {
    let mut cmd = Command::new(binary()?);
    home.apply(&mut cmd);
    cmd.env("KUBECONFIG", &sb.kubeconfig).env_remove("TPD_CONFIG").stdin(Stdio::null());
    Ok(cmd)
}

/// Runs `tpd ARGS` to completion.
pub fn tpd_output(sb: &Sandbox, args: &[&str]) -> Result<Output> {
    tpd(sb)?.args(args).output().context("running tpd")
}

/// Starts `tpd ARGS` in the background with its output captured.
pub fn tpd_spawn(sb: &Sandbox, args: &[&str]) -> Result<Child> {
    tpd(sb)?.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting tpd")
}

/// `kubectl get deployment NAME -o json`.
pub fn deployment_json(sb: &Sandbox, ns: &str, name: &str) -> Result<Value> {
    let out = sb.kubectl_ok(&["get", "deployment", name, "-n", ns, "-o", "json"])?;
    serde_json::from_str(&out).context("parsing kubectl's JSON")
}

/// The Deployment without what the API server owns (resourceVersion,
/// generation, managedFields, status, the revision annotation): what must be
/// identical before a swap and after its restore.
pub fn user_owned(mut d: Value) -> Value {
    if let Some(meta) = d.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in ["resourceVersion", "generation", "managedFields"] {
            meta.remove(key);
        }
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("deployment.kubernetes.io/revision");
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    if let Some(obj) = d.as_object_mut() {
        obj.remove("status");
    }
    d
}

/// The swap record on the Deployment, if swapped.
pub fn swap_record(d: &Value) -> Option<Value> {
    let text = d["metadata"]["annotations"][SWAP_ANNOTATION].as_str()?;
    serde_json::from_str(text).ok()
}

/// Polls until `pred` holds for the Deployment; returns it and the time taken.
pub fn wait_deployment(
    sb: &Sandbox,
    ns: &str,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<(Value, Duration)> {
    let started = Instant::now();
    loop {
        let d = deployment_json(sb, ns, name)?;
        if pred(&d) {
            return Ok((d, started.elapsed()));
        }
        if started.elapsed() > timeout {
            bail!("deployment/{name} did not reach the expected state in {timeout:?}; last: {}", d["metadata"]);
        }
        crate::interrupt::pause(Duration::from_millis(50))?;
    }
}

/// Waits until deployment `name` carries a swap record; returns the
/// Deployment and the id of the session that swapped it.
pub fn wait_swapped(sb: &Sandbox, ns: &str, name: &str, timeout: Duration) -> Result<(Value, String)> {
    let (d, _) = wait_deployment(sb, ns, name, timeout, |d| swap_record(d).is_some())?;
    let id = swap_record(&d)
        .and_then(|r| r["session"].as_str().map(str::to_owned))
        .context("the swap record names its session")?;
    Ok((d, id))
}

/// Starts `tpd ARGS`, a `tpd run --name DEV --swap deployment/NAME` in
/// namespace `ns`, and waits until the swap is made (its session then goes
/// into `cleanup`) and the local container `dev` runs. Fails with what tpd
/// said when it ends first or takes more than two minutes.
pub fn start_swapped(
    sb: &Sandbox,
    cleanup: &mut Cleanup,
    args: &[&str],
    (ns, name, dev): (&str, &str, &str),
) -> Result<(Child, String)> {
    let started = Instant::now();
    let mut child = tpd_spawn(sb, args)?;
    let (_, id) = match wait_swapped(sb, ns, name, Duration::from_secs(60)) {
        Ok(swapped) => swapped,
        Err(e) => {
            let _ = child.kill();
            bail!("{e:#}\ntpd said:\n{}", stderr_of(&mut child));
        }
    };
    cleanup.sessions.push(id.clone());
    while !docker_exec(dev, "true").0 {
        if started.elapsed() > Duration::from_secs(120) || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("the local container never started\ntpd said:\n{}\n{}", stderr_of(&mut child), session_logs(sb, &id));
        }
        crate::interrupt::pause(Duration::from_millis(100))?;
    }
    eprintln!("swapped, local container running {:?} after `tpd run`", started.elapsed());
    Ok((child, id))
}

/// Local containers of a tpd session (any state).
pub fn session_containers(session: &str) -> Result<Vec<String>> {
    let filter = format!("label={}={session}", tpd_wire::names::LABEL_SESSION);
    let out = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
}

/// What tpd and its guardian logged for `session` (their files under the
/// cache directory of the sandbox's home), for failure messages: the
/// guardian runs detached, so its log is the only account of a cleanup that
/// went wrong.
pub fn session_logs(sb: &Sandbox, session: &str) -> String {
    session_logs_in(&sb.home, session)
}

/// [`session_logs`] of a session started from `home`.
pub fn session_logs_in(home: &Home, session: &str) -> String {
    let dir = home.cache().join("tpd");
    let mut out = String::new();
    for name in [format!("{session}.log"), format!("{session}-guardian.log")] {
        let text = std::fs::read_to_string(dir.join(&name)).unwrap_or_else(|e| format!("({e})"));
        out.push_str(&format!("--- {name} ---\n{text}\n"));
    }
    let filter = format!("label={}={session}", tpd_wire::names::LABEL_SESSION);
    if let Ok(ps) = Command::new("docker")
        .args(["ps", "-a", "--filter", &filter, "--format", "{{.ID}} {{.Names}} {{.Status}}"])
        .output()
    {
        out.push_str(&format!("--- its containers ---\n{}", String::from_utf8_lossy(&ps.stdout)));
    }
    out
}

/// SIGKILLs the guardian of `session`, as when the laptop vanished.
pub fn kill_guardian(session: &str) {
    let Ok(found) = Command::new("pgrep").args(["-f", &format!("guardian --session {session}")]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&found.stdout).lines() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// Kills, on drop, the tpd processes a test started and removes the local
/// containers and volume directories of the sessions it saw (by their
/// session label), so a failing test leaves nothing behind. A session whose
/// sidecar was killed left dead FUSE mounts in its volume directory; they
/// are released the way tpd's own cleanup does, or the directory would stay.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub children: Vec<Child>,
    pub sessions: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for session in &self.sessions {
            let filter = format!("label={}={session}", tpd_wire::names::LABEL_SESSION);
            let Ok(out) = Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() else {
                continue;
            };
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
            if !ids.is_empty() {
                let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
            }
            if let Err(e) = release_volumes(session) {
                eprintln!("cleanup: the volume directory of session {session} is left: {e:#}");
            }
        }
    }
}

/// tpd's own release of a session's volume directory (`mounts::release`),
/// on a runtime of its own: a test's drop may run inside another one.
fn release_volumes(session: &str) -> Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let docker = bollard::Docker::connect_with_local_defaults()?;
                    let labels = [(tpd_wire::names::LABEL_SESSION.to_owned(), session.to_owned())].into();
                    tpd::mounts::release(&docker, session, &crate::images::tpd_sidecar(), labels).await
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the volume release panicked"))?
    })
}

/// Runs a one-shot pod (`kubectl run NAME --restart=Never -- CMD…`), waits
/// until it has finished, and returns its phase and output.
pub fn run_pod(sb: &Sandbox, name: &str, image: &str, cmd: &[&str]) -> Result<(String, String)> {
    let mut args = vec!["run", name, "--image", image, "--restart=Never", "--"];
    args.extend_from_slice(cmd);
    sb.kubectl_ok(&args)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let phase = loop {
        let phase = sb.kubectl_ok(&["get", "pod", name, "-o", "jsonpath={.status.phase}"]).unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            break phase;
        }
        if Instant::now() > deadline {
            let logs = sb.kubectl_ok(&["logs", name]).unwrap_or_default();
            bail!("pod {name} did not finish within 60 s (phase {phase:?}); its output:\n{logs}");
        }
        crate::interrupt::pause(Duration::from_millis(200))?;
    };
    Ok((phase, sb.kubectl_ok(&["logs", name])?))
}

/// `kubectl create deployment NAME --image echo` with a Service on port 80
/// (target 8080), rolled out.
pub fn deploy_echo(sb: &Sandbox, name: &str) -> Result<()> {
    sb.kubectl_ok(&["create", "deployment", name, "--image", images::ECHO, "--port", "8080"])?;
    sb.kubectl_ok(&["expose", "deployment", name, "--port", "80", "--target-port", "8080"])?;
    sb.kubectl_ok(&["rollout", "status", &format!("deployment/{name}"), "--timeout", "60s"])?;
    Ok(())
}

/// Names (`service/NAME`) of the Services a tpd session created in the namespace.
pub fn session_services(sb: &Sandbox, ns: &str, session: &str) -> Result<Vec<String>> {
    let selector = format!("{}={session}", tpd_wire::names::LABEL_SESSION);
    let out = sb.kubectl_ok(&["get", "services", "-n", ns, "-l", &selector, "-o", "name"])?;
    Ok(out.lines().map(str::to_owned).filter(|l| !l.is_empty()).collect())
}

/// Waits until the local container `name` runs (`docker exec NAME true` works).
pub fn wait_container(name: &str, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let ok = Command::new("docker")
            .args(["exec", name, "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("the container {name} did not start within {timeout:?}");
        }
        crate::interrupt::pause(Duration::from_millis(100))?;
    }
}

/// Waits until `child` exits; kills it and fails after `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            bail!("tpd did not exit within {timeout:?}");
        }
        if let Err(e) = crate::interrupt::pause(Duration::from_millis(100)) {
            let _ = child.kill();
            return Err(e);
        }
    }
}

/// What a spawned tpd wrote to stderr (it must have exited, or this blocks).
pub fn stderr_of(child: &mut Child) -> String {
    let mut said = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut said);
    }
    said
}

/// Ctrl-C to a spawned tpd, as a user ends a session; waits for it to exit
/// and returns what it said.
pub fn interrupt(mut child: Child) -> Result<String> {
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status()?;
    if !sent.success() {
        bail!("kill -INT {} failed", child.id());
    }
    let status = wait_exit(&mut child, Duration::from_secs(60))?;
    let said = stderr_of(&mut child);
    if status.code().is_none() {
        bail!("tpd did not end by itself after Ctrl-C ({status}):\n{said}");
    }
    Ok(said)
}

/// Waits until `child` exits and returns its output; kills it and fails
/// with what it said after `timeout`.
pub fn output_within(mut child: Child, timeout: Duration) -> Result<Output> {
    if let Err(e) = wait_exit(&mut child, timeout) {
        bail!("{e:#}:\n{}", stderr_of(&mut child));
    }
    child.wait_with_output().context("reading tpd's output")
}

/// Waits until deployment `name` is as `original` again (swap restored) and
/// session `id` left no local container.
pub fn restored(sb: &Sandbox, ns: &str, name: &str, original: &Value, id: &str) -> Result<()> {
    let (d, _) = wait_deployment(sb, ns, name, Duration::from_secs(30), |d| swap_record(d).is_none())?;
    if &user_owned(d) != original {
        bail!("the restored deployment/{name} differs from the original");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !session_containers(id)?.is_empty() {
        if Instant::now() > deadline {
            bail!("containers of session {id} left behind\n{}", session_logs(sb, id));
        }
        crate::interrupt::pause(Duration::from_millis(100))?;
    }
    Ok(())
}

/// `sh -c SCRIPT` in a local container: (succeeded, stdout, stderr), trimmed.
pub fn docker_exec(container: &str, script: &str) -> (bool, String, String) {
    let out = Command::new("docker").args(["exec", container, "sh", "-c", script]).output().expect("docker exec runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// A shell command in the developer's container that must succeed.
pub fn local(container: &str, script: &str) -> String {
    let (ok, out, err) = docker_exec(container, script);
    assert!(ok, "`{script}` failed in the developer's container: {err}");
    out
}

/// A shell command in the `watcher` container of `pod` (the test
/// Deployments' neighbour of the swapped container) that must succeed.
pub fn in_pod(sb: &Sandbox, pod: &str, script: &str) -> String {
    sb.kubectl_ok(&["exec", pod, "-c", "watcher", "--", "sh", "-c", script])
        .unwrap_or_else(|e| panic!("{e:#}"))
        .trim()
        .to_owned()
}
