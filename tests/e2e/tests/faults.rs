//! What real clusters and laptops do to a session, through the real `tpd`
//! binary against the sandbox: other controllers keep writing the
//! Deployment while it is swapped, the agent pod is deleted mid-session (its
//! ReplicaSet starts another), the sidecar container is killed, the
//! developer's container runs out of memory. Each step asserts what a user
//! would check and prints its figures (the table in RELIABILITY.md).

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};

use tpd_e2e::home::Home;
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, swap_record, tpd_spawn, user_owned, wait_deployment};
use tpd_wire::names::LABEL_SESSION;

const NS: &str = "default";

/// The local app: answers `local-app` on port 8080.
const LOCAL_APP: &str = "mkdir -p /w && echo local-app > /w/index.html && cd /w && exec python3 -m http.server 8080";

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn a_session_survives_what_clusters_and_laptops_do_to_it() {
    session::prerequisites().unwrap();
    let sb = Sandbox::up().unwrap();
    session::deploy_echo(&sb, "hello").unwrap();
    session::deploy_echo(&sb, "world").unwrap();
    sb.kubectl_ok(&["run", "client", "--image", images::DEBIAN, "--restart=Never", "--", "sleep", "1800"]).unwrap();
    let original = user_owned(session::deployment_json(&sb, NS, "hello").unwrap());

    controllers_keep_writing(&sb, &original);
    agent_pod_replaced(&sb, &original);
    api_server_stalls(&sb, &original);
    laptop_sleeps(&sb, &original);
    laptop_sleeps_while_the_swap_is_repaired(&sb, &original);
    sidecar_killed(&sb, &original);
    out_of_memory(&sb);
}

/// Controllers keep writing the Deployment while tpd swaps it (the
/// deployment controller writes status and its revision annotation right
/// after a rollout; operators add annotations): the swap is made at once,
/// and what they wrote is kept.
fn controllers_keep_writing(sb: &Sandbox, original: &serde_json::Value) {
    const KEY: &str = "example.com/heartbeat";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api: Api<Deployment> = Api::namespaced(rt.block_on(sb.client()).unwrap(), NS);
    let stop = Arc::new(AtomicBool::new(false));
    // Bounded: at most 3000 writes and 120 s.
    let writer = rt.spawn({
        let (api, stop) = (api.clone(), stop.clone());
        async move {
            let started = Instant::now();
            let mut written = 0u32;
            while written < 3000 && !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let beat = serde_json::json!({"metadata": {"annotations": {KEY: written.to_string()}}});
                api.patch("hello", &PatchParams::default(), &Patch::Merge(&beat)).await.unwrap();
                written += 1;
            }
            written
        }
    });
    let mut cleanup = Cleanup::default();
    let (child, id) = swap_hello(sb, &mut cleanup, &["sleep", "600"]);
    cleanup.children.push(child);
    stop.store(true, Ordering::Relaxed);
    let written = rt.block_on(writer).unwrap();
    assert!(written > 0, "the other controller wrote nothing while tpd swapped");
    let d = session::deployment_json(sb, NS, "hello").unwrap();
    assert!(swap_record(&d).is_some(), "swapped while another controller wrote {written} times");
    let last = (written - 1).to_string();
    assert_eq!(d["metadata"]["annotations"][KEY], last.as_str(), "the other controller's last write is kept");
    eprintln!("another controller wrote deployment/hello {written} times during the swap: swapped at once");

    sb.kubectl_ok(&["annotate", "deployment/hello", &format!("{KEY}-")]).unwrap();
    session::interrupt(cleanup.children.pop().unwrap()).unwrap();
    session::restored(sb, NS, "hello", original, &id).unwrap();
}

/// `kubectl delete pod` of the agent: the session follows the new pod;
/// inbound and outbound work again; the user sees one line about it.
fn agent_pod_replaced(sb: &Sandbox, original: &serde_json::Value) {
    let mut cleanup = Cleanup::default();
    let (child, id) = swap_hello(sb, &mut cleanup, &["sh", "-c", LOCAL_APP]);
    cleanup.children.push(child);
    answers(sb, "local-app", Duration::from_secs(60));

    let old = agent_pod(sb, &id, None);
    sb.kubectl_ok(&["delete", "pod", &old, "--wait=false"]).unwrap();
    let deleted = Instant::now();
    let new = agent_pod(sb, &id, Some(&old));
    let running = deleted.elapsed();
    let served = answers(sb, "local-app", Duration::from_secs(60));
    let outbound = docker_exec(&format!("tpd-{id}"), &["curl", "-s", "-m", "5", "http://world/"]);
    assert!(outbound.contains("hello from world-"), "outbound after the replacement: {outbound}");
    eprintln!(
        "agent pod replaced ({old} -> {new}): new pod Running {:.1} s after the delete; inbound served again {:.1} s after that (target 5 s)",
        running.as_secs_f64(),
        served.as_secs_f64()
    );

    let said = session::interrupt(cleanup.children.pop().unwrap()).unwrap();
    assert_eq!(said.matches("was replaced by").count(), 1, "one line says the agent pod was replaced:\n{said}");
    assert!(!said.contains("WARN") && !said.contains("Status {"), "no warnings or dumps on the terminal:\n{said}");
    session::restored(sb, NS, "hello", original, &id).unwrap();
}

/// The API server stops answering for 20 s (SIGSTOP) while a 64 MiB
/// download runs through the tunnel: the download ends intact, and the
/// session keeps its swap (the renewals that hung go through afterwards).
fn api_server_stalls(sb: &Sandbox, original: &serde_json::Value) {
    let mut cleanup = Cleanup::default();
    let (child, id) = swap_hello(sb, &mut cleanup, &["sh", "-c", LOCAL_APP]);
    cleanup.children.push(child);
    answers(sb, "local-app", Duration::from_secs(60));
    let dev = format!("tpd-{id}");
    let expected = tpd_e2e::dataplane::echo_bytes_sha256(64 << 20);
    // 2 MiB/s: the download spans the stall.
    let download =
        "curl -s --limit-rate 2M http://world/bytes/67108864 | sha256sum > /tmp/sum.part && mv /tmp/sum.part /tmp/sum";
    let started = Instant::now();
    assert!(Command::new("docker").args(["exec", "-d", &dev, "sh", "-c", download]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(3));
    let pid = std::fs::read_to_string(sb.state_dir().join("pid")).unwrap().trim().to_owned();
    {
        let _stopped = Stopped::processes(vec![pid]);
        std::thread::sleep(Duration::from_secs(20));
    }
    let sum = wait_file(&dev, "/tmp/sum", Duration::from_secs(120));
    assert_eq!(sum.split_whitespace().next(), Some(expected.as_str()), "the download's sha256");
    eprintln!("API server stalled 20 s: 64 MiB download intact after {:.1} s", started.elapsed().as_secs_f64());
    let child = cleanup.children.last_mut().unwrap();
    assert!(child.try_wait().unwrap().is_none(), "the session lives on:\n{}", session::stderr_of(child));
    let d = session::deployment_json(sb, NS, "hello").unwrap();
    assert_eq!(swap_record(&d).unwrap()["session"].as_str(), Some(id.as_str()), "the session still holds its swap");
    answers(sb, "local-app", Duration::from_secs(30));
    session::interrupt(cleanup.children.pop().unwrap()).unwrap();
    session::restored(sb, NS, "hello", original, &id).unwrap();
}

/// The laptop sleeps 45 s, past the lease: tpd, its guardian and the
/// session's containers are frozen. `tpd status` (from another terminal)
/// shows the lease expired meanwhile; on wake the session takes its lease
/// again and serves again.
fn laptop_sleeps(sb: &Sandbox, original: &serde_json::Value) {
    let mut cleanup = Cleanup::default();
    let (child, id) = swap_hello(sb, &mut cleanup, &["sh", "-c", LOCAL_APP]);
    let tpd_pid = child.id();
    cleanup.children.push(child);
    answers(sb, "local-app", Duration::from_secs(60));
    {
        let _asleep = Stopped::session(tpd_pid, &id);
        std::thread::sleep(Duration::from_secs(20));
        let lease = lease_live(sb);
        assert_eq!(lease, Some(false), "tpd status shows the lease expired while the laptop sleeps");
        std::thread::sleep(Duration::from_secs(25));
    }
    let served = answers(sb, "local-app", Duration::from_secs(60));
    eprintln!("laptop slept 45 s: served again {:.1} s after waking (target 10 s)", served.as_secs_f64());
    std::thread::sleep(lease_renewal());
    assert_eq!(lease_live(sb), Some(true), "the session took its lease again");
    session::interrupt(cleanup.children.pop().unwrap()).unwrap();
    session::restored(sb, NS, "hello", original, &id).unwrap();
}

/// The laptop sleeps past the lease and its grace, and a `tpd` command on
/// another machine repairs the abandoned swap meanwhile: on wake the session
/// says it lost the swap and ends non-zero, leaving nothing half-restored.
fn laptop_sleeps_while_the_swap_is_repaired(sb: &Sandbox, original: &serde_json::Value) {
    let mut cleanup = Cleanup::default();
    let (mut child, id) = swap_hello(sb, &mut cleanup, &["sleep", "600"]);
    session::wait_container(&format!("tpd-{id}"), Duration::from_secs(60)).unwrap();
    {
        let _asleep = Stopped::session(child.id(), &id);
        std::thread::sleep(Duration::from_secs(35));
        let other = Home::new().unwrap();
        let out = session::tpd_in(sb, &other).unwrap().args(["status"]).output().unwrap();
        assert!(out.status.success(), "tpd status: {}", String::from_utf8_lossy(&out.stderr));
        let d = session::deployment_json(sb, NS, "hello").unwrap();
        assert!(swap_record(&d).is_none(), "another machine's tpd repaired the abandoned swap");
    }
    let status = session::wait_exit(&mut child, Duration::from_secs(60)).unwrap();
    let said = session::stderr_of(&mut child);
    assert!(!status.success(), "tpd ends non-zero after losing its swap:\n{said}");
    assert!(said.contains("lost the swap of deployment/hello"), "tpd says why:\n{said}");
    session::restored(sb, NS, "hello", original, &id).unwrap();
}

/// `docker kill` of the sidecar: tpd says so naming it, exits non-zero,
/// restores the Deployment and removes the developer's container.
fn sidecar_killed(sb: &Sandbox, original: &serde_json::Value) {
    let mut cleanup = Cleanup::default();
    let (mut child, id) = swap_hello(sb, &mut cleanup, &["sleep", "600"]);
    let sidecar = format!("tpd-sidecar-{id}");
    session::wait_container(&format!("tpd-{id}"), Duration::from_secs(60)).unwrap();
    let killed = Command::new("docker").args(["kill", &sidecar]).output().unwrap();
    assert!(killed.status.success(), "docker kill {sidecar}: {}", String::from_utf8_lossy(&killed.stderr));
    let status = session::wait_exit(&mut child, Duration::from_secs(60)).unwrap();
    let said = session::stderr_of(&mut child);
    assert!(!status.success(), "tpd exits non-zero when its sidecar is killed:\n{said}");
    assert!(said.contains(&sidecar), "the message names the sidecar {sidecar}:\n{said}");
    session::restored(sb, NS, "hello", original, &id).unwrap();
}

/// A developer's container that runs out of memory: tpd says so and exits
/// with 137, as `docker run` does.
fn out_of_memory(sb: &Sandbox) {
    let hog = "x = b'x' * (512 * 1024 * 1024); print(len(x))";
    let out = session::tpd(sb)
        .unwrap()
        .args(["run", "-m", "32m", "--image", images::DEBIAN, "--", "python3", "-c", hog])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(137), "exit code of an OOM-killed container:\n{said}");
    assert!(said.contains("out of memory"), "tpd says why:\n{said}");
}

/// Starts `tpd run --swap deployment/hello -- CMD` and waits for the swap;
/// returns the process and the session id.
fn swap_hello(sb: &Sandbox, cleanup: &mut Cleanup, cmd: &[&str]) -> (Child, String) {
    let mut args = vec!["run", "--image", images::DEBIAN, "--swap", "deployment/hello", "--port", "8080:8080", "--"];
    args.extend_from_slice(cmd);
    let mut child = tpd_spawn(sb, &args).unwrap();
    let d = match wait_deployment(sb, NS, "hello", Duration::from_secs(90), |d| swap_record(d).is_some()) {
        Ok((d, _)) => d,
        Err(e) => {
            let _ = child.kill();
            panic!("{e:#}\ntpd said:\n{}", session::stderr_of(&mut child))
        }
    };
    let id = swap_record(&d).unwrap()["session"].as_str().unwrap().to_owned();
    cleanup.sessions.push(id.clone());
    (child, id)
}

/// Waits until `curl http://hello/` from the client pod answers `expect`;
/// returns how long that took.
fn answers(sb: &Sandbox, expect: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < timeout {
        let out =
            sb.kubectl().args(["exec", "client", "--", "curl", "-s", "-m", "2", "http://hello/"]).output().unwrap();
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains(expect) {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the client pod did not get {expect:?} from http://hello/ within {timeout:?}; last: {last:?}");
}

/// The Running agent pod of session `id` other than `not`.
fn agent_pod(sb: &Sandbox, id: &str, not: Option<&str>) -> String {
    let selector = format!("{LABEL_SESSION}={id}");
    let jsonpath = r#"jsonpath={range .items[?(@.status.phase=="Running")]}{.metadata.name}{"\n"}{end}"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = sb.kubectl_ok(&["get", "pods", "-l", &selector, "-o", jsonpath]).unwrap();
        if let Some(pod) = out.lines().find(|p| !p.is_empty() && Some(*p) != not) {
            return pod.to_owned();
        }
        assert!(Instant::now() < deadline, "no Running agent pod of session {id} other than {not:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes stopped with SIGSTOP and containers paused, until dropped
/// (also when the test fails), as a laptop's sleep freezes them.
struct Stopped {
    pids: Vec<String>,
    containers: Vec<String>,
}

impl Stopped {
    fn processes(pids: Vec<String>) -> Self {
        Self::freeze(pids, Vec::new())
    }

    /// tpd, its guardian and the session's containers.
    fn session(tpd: u32, id: &str) -> Self {
        let guardian = Command::new("pgrep").args(["-f", &format!("guardian --session {id}")]).output().unwrap();
        let mut pids: Vec<String> = String::from_utf8_lossy(&guardian.stdout).lines().map(str::to_owned).collect();
        pids.push(tpd.to_string());
        Self::freeze(pids, session::session_containers(id).unwrap())
    }

    fn freeze(pids: Vec<String>, containers: Vec<String>) -> Self {
        for pid in &pids {
            assert!(Command::new("kill").args(["-STOP", pid]).status().unwrap().success(), "kill -STOP {pid}");
        }
        if !containers.is_empty() {
            let paused = Command::new("docker").arg("pause").args(&containers).output().unwrap();
            assert!(paused.status.success(), "docker pause: {}", String::from_utf8_lossy(&paused.stderr));
        }
        Stopped { pids, containers }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.containers.is_empty() {
            let _ = Command::new("docker").arg("unpause").args(&self.containers).output();
        }
        for pid in &self.pids {
            let _ = Command::new("kill").args(["-CONT", pid]).status();
        }
    }
}

/// `lease_live` of the one swap `tpd status` lists, from a home of its own.
fn lease_live(sb: &Sandbox) -> Option<bool> {
    let home = Home::new().unwrap();
    let out = session::tpd_in(sb, &home).unwrap().args(["status", "--output", "json"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status["swaps"][0]["lease_live"].as_bool()
}

/// Long enough for a renewal to have gone through.
fn lease_renewal() -> Duration {
    Duration::from_secs(6)
}

/// Waits until `path` in the container exists; returns its content.
fn wait_file(container: &str, path: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new("docker").args(["exec", container, "cat", path]).output().unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "{path} did not appear in {container} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn docker_exec(container: &str, cmd: &[&str]) -> String {
    let out = Command::new("docker").arg("exec").arg(container).args(cmd).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
