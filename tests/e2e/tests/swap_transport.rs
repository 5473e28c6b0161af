//! `tpd run --swap` over each transport, and how the developer's container
//! ends a session, through the real `tpd` binary against the sandbox:
//!
//! - `--transport udp`: the seed walkthrough (a client pod reaches the local
//!   server through the swap, the local container reaches a cluster Service
//!   by name), `tpd status` reports udp, and after Ctrl-C the session's
//!   NodePort Service is gone and the Deployment equals the original;
//! - `--transport auto` picks udp on the sandbox, and tpd exits with the
//!   developer's command's exit code;
//! - `docker kill` of the developer's container ends the session with a
//!   message and restores the Deployment;
//! - `-i` carries piped stdin to the container (`echo hi | tpd run -i -- cat`);
//! - the NodePort Service goes on every exit path: Ctrl-C, the command
//!   exiting, the guardian after `kill -9`, `tpd restore`, and the repair of
//!   an expired lease;
//! - a pod that reaches the swapped pod's transport port directly (not
//!   through a port-forward) gets nothing back, and tpd's session starts.
//!
//! One sandbox instance serves every step (one instance per machine).

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, swap_record, tpd_output, user_owned, wait_deployment};

const NS: &str = "default";
const SERVE: &str = "mkdir -p /srv && echo served-locally > /srv/index.html && exec busybox httpd -f -p 9000 -h /srv";

/// Starts `tpd ARGS` with stdout and stderr going to one file, read back by [`log`].
fn spawn_logged(sb: &Sandbox, cleanup: &mut Cleanup, log: &tempfile::NamedTempFile, args: &[&str]) -> u32 {
    let out = File::create(log.path()).unwrap();
    let child = session::tpd(sb).unwrap().args(args).stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
    let pid = child.id();
    cleanup.children.push(child);
    pid
}

fn log(file: &tempfile::NamedTempFile) -> String {
    std::fs::read_to_string(file.path()).unwrap_or_default()
}

/// The child `pid` among the cleanup's children.
fn child(cleanup: &mut Cleanup, pid: u32) -> &mut Child {
    cleanup.children.iter_mut().find(|c| c.id() == pid).unwrap()
}

/// Waits until hello is swapped; registers the session for cleanup and returns its id.
fn swapped(sb: &Sandbox, cleanup: &mut Cleanup) -> String {
    let (d, _) = wait_deployment(sb, NS, "hello", Duration::from_secs(60), |d| swap_record(d).is_some()).unwrap();
    let session = swap_record(&d).unwrap()["session"].as_str().unwrap().to_owned();
    cleanup.sessions.push(session.clone());
    session
}

/// Within `timeout`, the Deployment is back as it was and nothing of the
/// session is left in the cluster (its NodePort Service) or locally (its
/// containers).
fn all_gone(sb: &Sandbox, original: &Value, session: &str, timeout: Duration) {
    let started = Instant::now();
    let (d, _) = wait_deployment(sb, NS, "hello", timeout, |d| swap_record(d).is_none()).unwrap();
    assert_eq!(&user_owned(d), original, "the restored Deployment differs from the original");
    loop {
        let (services, containers) =
            (session::session_services(sb, NS, session).unwrap(), session::session_containers(session).unwrap());
        if services.is_empty() && containers.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "left behind by session {session}: {services:?}, containers {containers:?}\n{}",
            session::session_logs(sb, session)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a `--transport udp` session holding hello and waits until its
/// NodePort Service exists; returns tpd's pid and the session id.
fn udp_session(sb: &Sandbox, cleanup: &mut Cleanup, log: &tempfile::NamedTempFile) -> (u32, String) {
    let pid = spawn_logged(
        sb,
        cleanup,
        log,
        &["run", "--transport", "udp", "--image", images::DEBIAN, "--swap", "deployment/hello", "--", "sleep", "600"],
    );
    let id = swapped(sb, cleanup);
    let started = Instant::now();
    while session::session_services(sb, NS, &id).unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no NodePort Service for session {id}; tpd said:\n{}",
            self::log(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (pid, id)
}

/// The pid of the guardian of `session` (a `tpd guardian --session ID` process).
fn guardian_pid(session: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_guardian = args.contains(&&b"guardian"[..])
            && args.windows(2).any(|w| w[0] == b"--session" && w[1] == session.as_bytes());
        is_guardian.then_some(pid)
    })
}

fn docker_out(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn transports_and_how_the_developers_container_ends_a_session() {
    session::prerequisites().unwrap();
    let sb = Sandbox::up().unwrap();
    let mut cleanup = Cleanup::default();
    session::deploy_echo(&sb, "hello").unwrap();
    session::deploy_echo(&sb, "world").unwrap();
    let original = user_owned(session::deployment_json(&sb, NS, "hello").unwrap());

    // --transport udp: the walkthrough over the NodePort Service.
    let dev = format!("tpd-e2e-udp-{}", std::process::id());
    let udp_log = tempfile::NamedTempFile::new().unwrap();
    let args = [
        "run",
        "--transport",
        "udp",
        "--image",
        images::DEBIAN,
        "--name",
        &dev,
        "--swap",
        "deployment/hello",
        "--port",
        "8080:9000",
        "--",
        "sh",
        "-c",
        SERVE,
    ];
    let pid = spawn_logged(&sb, &mut cleanup, &udp_log, &args);
    let id = swapped(&sb, &mut cleanup);
    session::wait_container(&dev, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\ntpd said:\n{}", log(&udp_log)));
    let services = session::session_services(&sb, NS, &id).unwrap();
    assert_eq!(services, vec![format!("service/tpd-transport-{id}")], "the session's NodePort Service");
    let svc: Value = serde_json::from_str(&sb.kubectl_ok(&["get", &services[0], "-o", "json"]).unwrap()).unwrap();
    assert_eq!(
        (svc["spec"]["type"].as_str(), svc["spec"]["ports"][0]["protocol"].as_str()),
        (Some("NodePort"), Some("UDP")),
        "{svc}"
    );
    let status = tpd_output(&sb, &["status", "--output", "json"]).unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let mine = status["sessions"].as_array().unwrap().iter().find(|s| s["session"] == id.as_str()).cloned();
    assert_eq!(mine.as_ref().map(|s| &s["transport"]), Some(&Value::from("udp")), "tpd status: {status}");
    for name in ["world", "world.default.svc.cluster.local"] {
        let out = docker_out(&["exec", &dev, "curl", "-s", "-m", "10", &format!("http://{name}/")]);
        assert!(
            out.starts_with("hello from world-"),
            "curl {name} from the local container over udp: {out:?}\ntpd said:\n{}",
            log(&udp_log)
        );
    }
    let (phase, served) =
        session::run_pod(&sb, "client-udp", images::DEBIAN, &["curl", "-s", "-m", "10", "http://hello"]).unwrap();
    assert_eq!((phase.as_str(), served.trim()), ("Succeeded", "served-locally"), "a client pod calling hello over udp");
    Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    let code = session::wait_exit(child(&mut cleanup, pid), Duration::from_secs(60)).unwrap();
    assert_eq!(code.code(), Some(130), "tpd after Ctrl-C; it said:\n{}", log(&udp_log));
    assert!(log(&udp_log).contains("transport: udp"), "tpd says which transport it uses:\n{}", log(&udp_log));
    all_gone(&sb, &original, &id, Duration::from_secs(15));
    sb.rolled_out("default", "hello").unwrap();

    // Every other exit path deletes the NodePort Service too: the guardian
    // after `kill -9` of tpd (within 10 s) ...
    let kill9_log = tempfile::NamedTempFile::new().unwrap();
    let (pid, id) = udp_session(&sb, &mut cleanup, &kill9_log);
    Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    all_gone(&sb, &original, &id, Duration::from_secs(10));
    sb.rolled_out("default", "hello").unwrap();
    // ... `tpd restore` by hand (at once; the session then ends by itself) ...
    let restore_log = tempfile::NamedTempFile::new().unwrap();
    let (pid, id) = udp_session(&sb, &mut cleanup, &restore_log);
    let out = tpd_output(&sb, &["restore", "deployment/hello"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        session::session_services(&sb, NS, &id).unwrap(),
        Vec::<String>::new(),
        "tpd restore deletes the session's Service"
    );
    session::wait_exit(child(&mut cleanup, pid), Duration::from_secs(30)).unwrap();
    all_gone(&sb, &original, &id, Duration::from_secs(15));
    sb.rolled_out("default", "hello").unwrap();
    // ... and the repair of a lease that expired (tpd and its guardian both
    // gone, as when a laptop vanishes), which the next tpd command runs.
    let vanish_log = tempfile::NamedTempFile::new().unwrap();
    let (pid, id) = udp_session(&sb, &mut cleanup, &vanish_log);
    let guardian = guardian_pid(&id).expect("the session's guardian process");
    for p in [guardian, pid] {
        Command::new("kill").args(["-KILL", &p.to_string()]).status().unwrap();
    }
    let started = Instant::now();
    loop {
        let out = tpd_output(&sb, &["status"]).unwrap();
        if String::from_utf8_lossy(&out.stderr).contains("restored deployment/hello") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "the expired swap was never repaired");
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!(
        session::session_services(&sb, NS, &id).unwrap(),
        Vec::<String>::new(),
        "the repair deletes the session's Service"
    );
    let (d, _) = wait_deployment(&sb, NS, "hello", Duration::from_secs(5), |d| swap_record(d).is_none()).unwrap();
    assert_eq!(user_owned(d), original);
    sb.rolled_out("default", "hello").unwrap();

    // --transport auto picks udp here; tpd exits with the command's exit
    // code, which is 7 only if the cluster answered through the tunnel.
    let check = "curl -sf -m 10 http://world/ >/dev/null || exit 3; exit 7";
    let out = tpd_output(
        &sb,
        &[
            "run",
            "--transport",
            "auto",
            "--image",
            images::DEBIAN,
            "--swap",
            "deployment/hello",
            "--",
            "sh",
            "-c",
            check,
        ],
    )
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(7), "tpd's exit code is the command's; it said:\n{said}");
    assert!(said.contains("session ready (transport: udp to "), "auto picks udp on the sandbox:\n{said}");
    assert!(said.contains("exited with code 7"), "{said}");
    let (d, _) = wait_deployment(&sb, NS, "hello", Duration::from_secs(15), |d| swap_record(d).is_none()).unwrap();
    assert_eq!(user_owned(d), original);
    let leftover = sb.kubectl_ok(&["get", "services", "-l", "app.kubernetes.io/managed-by=tpd", "-o", "name"]).unwrap();
    assert_eq!(leftover.trim(), "", "no tpd Service is left after the session");
    sb.rolled_out("default", "hello").unwrap();

    // The developer's container is killed mid-session: the session ends,
    // says why, exits with the container's code and restores.
    let dev = format!("tpd-e2e-kill-{}", std::process::id());
    let kill_log = tempfile::NamedTempFile::new().unwrap();
    let pid = spawn_logged(
        &sb,
        &mut cleanup,
        &kill_log,
        &["run", "--image", images::DEBIAN, "--name", &dev, "--swap", "deployment/hello", "--", "sleep", "600"],
    );
    let id = swapped(&sb, &mut cleanup);
    session::wait_container(&dev, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\ntpd said:\n{}", log(&kill_log)));
    assert!(Command::new("docker").args(["kill", &dev]).output().unwrap().status.success());
    let code = session::wait_exit(child(&mut cleanup, pid), Duration::from_secs(60)).unwrap();
    let said = log(&kill_log);
    assert_eq!(code.code(), Some(137), "tpd exits with the killed container's code; it said:\n{said}");
    assert!(said.contains(&format!("your container {dev} was killed by signal 9")), "{said}");
    all_gone(&sb, &original, &id, Duration::from_secs(15));

    // -i: piped stdin reaches the container (outbound only, no swap).
    let mut tpd = session::tpd(&sb).unwrap();
    let mut cat = tpd
        .args(["run", "-i", "--image", images::DEBIAN, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let code = session::wait_exit(&mut cat, Duration::from_secs(120));
    let out = cat.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(code.unwrap().success(), "{said}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "stderr: {said}");
    let agents = sb.kubectl_ok(&["get", "pods", "-l", "app.kubernetes.io/managed-by=tpd", "-o", "name"]).unwrap();
    assert_eq!(agents.trim(), "", "the outbound-only agent pod is deleted");

    drop(cleanup);
}

/// What a pod sees when it dials `IP:PORT` and says `HELLO` (hex), as a
/// sidecar would: `received N bytes` (a reset, an EOF and a timeout are all
/// "nothing came"), or `unreachable` when it could not connect within 60 s.
/// It retries the connect, so it can be started before the agent listens.
const INTRUDE: &str = r#"
import binascii, socket, sys, time
addr, hello = (sys.argv[1], int(sys.argv[2])), binascii.unhexlify(sys.argv[3])
deadline = time.time() + 60
while True:
    try:
        s = socket.create_connection(addr, timeout=2)
        break
    except OSError:
        if time.time() > deadline:
            print('unreachable')
            sys.exit(0)
        time.sleep(0.05)
got = b''
try:
    s.settimeout(3)
    s.sendall(hello)
    while True:
        b = s.recv(4096)
        if not b:
            break
        got += b
except OSError:
    pass
print('received %d bytes' % len(got))
"#;

/// Waits until `pod` runs.
fn wait_running(sb: &Sandbox, pod: &str) {
    let started = Instant::now();
    while sb.kubectl_ok(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"]).unwrap_or_default() != "Running" {
        assert!(started.elapsed() < Duration::from_secs(60), "pod {pod} is not running after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The IP of the session's agent pod, as soon as it has one.
fn agent_pod_ip(sb: &Sandbox, session: &str, log: &tempfile::NamedTempFile) -> String {
    let selector = format!("{}={session}", tpd_wire::names::LABEL_SESSION);
    let started = Instant::now();
    loop {
        let ip = sb.kubectl_ok(&["get", "pods", "-l", &selector, "-o", "jsonpath={.items[0].status.podIP}"]);
        if let Some(ip) = ip.ok().filter(|ip| !ip.is_empty()) {
            return ip;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the agent pod got no IP; tpd said:\n{}", self::log(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue #18, item 5: the agent admits a session only over its pod's
/// loopback, where a kubelet's port-forward lands. A pod that dials the
/// swapped pod's transport port as soon as it has an IP (before tpd's
/// port-forward, if it wins the race) and introduces itself as a sidecar
/// learns nothing, not even the agent's key; tpd's session then starts
/// and serves inbound traffic.
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn a_pod_cannot_take_a_swapped_pods_session() {
    session::prerequisites().unwrap();
    let sb = Sandbox::up().unwrap();
    let mut cleanup = Cleanup::default();
    session::deploy_echo(&sb, "hello").unwrap();
    let original = user_owned(session::deployment_json(&sb, NS, "hello").unwrap());
    sb.kubectl_ok(&["run", "intruder", "--image", images::DEBIAN, "--restart=Never", "--", "sleep", "600"]).unwrap();
    wait_running(&sb, "intruder");

    let dev = format!("tpd-e2e-admit-{}", std::process::id());
    let tpd_log = tempfile::NamedTempFile::new().unwrap();
    let args = [
        "run",
        "--image",
        images::DEBIAN,
        "--name",
        &dev,
        "--swap",
        "deployment/hello",
        "--port",
        "8080:9000",
        "--",
        "sh",
        "-c",
        SERVE,
    ];
    let pid = spawn_logged(&sb, &mut cleanup, &tpd_log, &args);
    let id = swapped(&sb, &mut cleanup);
    let ip = agent_pod_ip(&sb, &id, &tpd_log);
    let key: [u8; 32] = std::array::from_fn(|i| i as u8 ^ 0x5a);
    let hello = tpd_wire::hello::Hello { role: tpd_wire::hello::Role::Sidecar, public_key: key }.encode();
    let hex: String = hello.iter().map(|b| format!("{b:02x}")).collect();
    let port = tpd_wire::names::AGENT_TRANSPORT_PORT.to_string();
    let seen = sb.kubectl_ok(&["exec", "intruder", "--", "python3", "-c", INTRUDE, &ip, &port, &hex]).unwrap();
    assert_eq!(seen.trim(), "received 0 bytes", "a pod dialling {ip}:{port} directly; tpd said:\n{}", log(&tpd_log));

    session::wait_container(&dev, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\ntpd said:\n{}", log(&tpd_log)));
    let (phase, served) =
        session::run_pod(&sb, "client", images::DEBIAN, &["curl", "-s", "-m", "10", "http://hello"]).unwrap();
    assert_eq!(
        (phase.as_str(), served.trim()),
        ("Succeeded", "served-locally"),
        "a client pod calling hello through tpd's session; tpd said:\n{}",
        log(&tpd_log)
    );
    Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    let code = session::wait_exit(child(&mut cleanup, pid), Duration::from_secs(60)).unwrap();
    assert_eq!(code.code(), Some(130), "tpd after Ctrl-C; it said:\n{}", log(&tpd_log));
    all_gone(&sb, &original, &id, Duration::from_secs(15));
    drop(cleanup);
}
