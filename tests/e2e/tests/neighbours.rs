//! The pod's other containers are on localhost in the local container, as
//! they are in the pod (issue #19, item 2), through the real `tpd` binary
//! on the sandbox cluster.
//!
//! `deployment/nb` has the swapped container (`nb`, port 8080) and a
//! helper (`watcher`) that listens on 127.0.0.1:6379 without declaring it,
//! declares and listens on 6380 (on 0.0.0.0) and 5353/udp (on 127.0.0.1),
//! and once told to (`/tmp/go`) also listens on 127.0.0.1:7002 and 7003.
//! The local container runs its own server on 8080 (the swapped port) and
//! on 127.0.0.1:7003, and the session asks for `--pod-port 7002`. From
//! inside the local container:
//! - 6379 (found listening in the pod), 6380 and 5353/udp (declared) reach
//!   the helper; 8080 is the local app's own and is not carried;
//! - 7002 is held by the sidecar from the start, before anything in the pod
//!   listens on it, and reaches the helper once it does;
//! - 7003, which the local app held first, stays the local app's, and tpd
//!   prints a warning naming the port.
//!
//! Before the sidecar carried the pod's ports, 127.0.0.1:6379 was
//! "connection refused" in the local container.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, docker_exec, in_pod, user_owned};

const NS: &str = "default";
const NAME: &str = "nb";

/// The helper: answers `<who>:<port> got <what was sent>` on each port.
const HELPER: &str = r#"
import os, socket, threading, time
def tcp(host, port, who):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(b'%s:%d got ' % (who, port) + c.recv(100))
        c.close()
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, port))
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(b'helper:%d/udp got ' % port + data, peer)
def later():
    while not os.path.exists('/tmp/go'):
        time.sleep(0.2)
    for port in (7002, 7003):
        threading.Thread(target=tcp, args=('127.0.0.1', port, b'helper'), daemon=True).start()
for host, port in (('127.0.0.1', 6379), ('0.0.0.0', 6380)):
    threading.Thread(target=tcp, args=(host, port, b'helper'), daemon=True).start()
threading.Thread(target=udp, args=('127.0.0.1', 5353), daemon=True).start()
threading.Thread(target=later, daemon=True).start()
while True:
    time.sleep(3600)
"#;

/// The developer's app: its own port 8080 and 127.0.0.1:7003, bound before
/// anything in the pod listens on 7003.
const LOCAL_APP: &str = r#"
import socket, threading, time
def tcp(host, port):
    s = socket.socket()
    s.bind((host, port))
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(b'local:%d got ' % port + c.recv(100))
        c.close()
for host, port in (('0.0.0.0', 8080), ('127.0.0.1', 7003)):
    threading.Thread(target=tcp, args=(host, port), daemon=True).start()
time.sleep(600)
"#;

fn manifest() -> String {
    let helper: String = HELPER.lines().map(|l| format!("          {l}\n")).collect();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {NAME}, labels: {{app: {NAME}}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {NAME}}}}}
  template:
    metadata: {{labels: {{app: {NAME}}}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: {NAME}
        image: {echo}
        ports: [{{containerPort: 8080}}]
      - name: watcher
        image: {debian}
        ports: [{{containerPort: 6380}}, {{containerPort: 5353, protocol: UDP}}]
        command:
        - python3
        - -c
        - |
{helper}"#,
        echo = images::ECHO,
        debian = images::DEBIAN,
    )
}

/// What a TCP client in the local container gets from 127.0.0.1:`port`
/// after sending `ping`, or the error it saw.
fn tcp_answer(dev: &str, port: u16) -> String {
    let script = format!(
        "python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', {port}), 5); s.sendall(b'ping'); \
         print(s.recv(100).decode())\" 2>&1 | tail -1"
    );
    docker_exec(dev, &script).1
}

fn udp_answer(dev: &str, port: u16) -> String {
    let script = format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); \
         s.sendto(b'ping', ('127.0.0.1', {port})); print(s.recv(100).decode())\" 2>&1 | tail -1"
    );
    docker_exec(dev, &script).1
}

/// Polls `probe` until it returns `want` or `timeout` passes; returns the last answer.
fn until(timeout: Duration, want: &str, probe: impl Fn() -> String) -> String {
    let started = Instant::now();
    loop {
        let got = probe();
        if got == want || started.elapsed() > timeout {
            return got;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn sidecar_stdout(session: &str) -> String {
    let out = Command::new("docker").args(["logs", &format!("tpd-sidecar-{session}")]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn the_pods_other_containers_are_on_localhost() -> anyhow::Result<()> {
    session::prerequisites()?;
    let sb = Sandbox::up()?;
    let mut cleanup = Cleanup::default();
    sb.apply(&manifest())?;
    sb.rolled_out(NS, NAME)?;
    let original = user_owned(session::deployment_json(&sb, NS, NAME)?);

    let dev = format!("tpd-e2e-{NAME}-{}", std::process::id());
    let target = format!("deployment/{NAME}");
    let args = ["run", "--image", images::DEBIAN, "--name", &dev, "--swap", &target, "--pod-port", "7002"];
    let args = [&args[..], &["--", "python3", "-c", LOCAL_APP]].concat();
    let (child, id) = session::start_swapped(&sb, &mut cleanup, &args, (NS, NAME, &dev))?;
    let selector = format!("app={NAME},{}={id}", tpd_wire::names::LABEL_SESSION);
    let pod = sb.kubectl_ok(&["get", "pods", "-l", &selector, "-o", "jsonpath={.items[0].metadata.name}"])?;

    // Found listening in the pod, undeclared; declared TCP and UDP.
    assert_eq!(
        until(Duration::from_secs(5), "helper:6379 got ping", || tcp_answer(&dev, 6379)),
        "helper:6379 got ping"
    );
    assert_eq!(tcp_answer(&dev, 6380), "helper:6380 got ping");
    assert_eq!(udp_answer(&dev, 5353), "helper:5353/udp got ping");
    // The swapped container's port is the local app's own.
    assert_eq!(tcp_answer(&dev, 8080), "local:8080 got ping");

    // `--pod-port 7002` is held before anything in the pod listens on it.
    let (bound, _, err) = docker_exec(&dev, "python3 -c \"import socket; socket.socket().bind(('127.0.0.1', 7002))\"");
    assert!(!bound && err.contains("Address already in use"), "7002 is the sidecar's from the start: {err}");
    let early = tcp_answer(&dev, 7002);
    assert!(!early.contains("got"), "nothing answers on 7002 in the pod yet: {early}");

    // Now the pod listens on 7002 and on 7003, which the local app holds.
    in_pod(&sb, &pod, "touch /tmp/go");
    assert_eq!(
        until(Duration::from_secs(10), "helper:7002 got ping", || tcp_answer(&dev, 7002)),
        "helper:7002 got ping"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sidecar_stdout(&id).contains("pod port 7003") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(tcp_answer(&dev, 7003), "local:7003 got ping", "the local app keeps its port");

    let said = session::interrupt(child)?;
    session::restored(&sb, NS, NAME, &original, &id).unwrap_or_else(|e| panic!("{e:#}\ntpd said:\n{said}"));
    let warning = said.lines().find(|l| l.contains("warning: pod port 7003")).unwrap_or_default();
    eprintln!("tpd warned: {warning}");
    assert!(warning.contains("127.0.0.1:7003"), "tpd names the clash in one line:\n{said}");
    assert!(!said.contains("pod port 8080"), "the swapped port is never a pod port:\n{said}");
    drop(cleanup);
    Ok(())
}
