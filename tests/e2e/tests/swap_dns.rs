//! Large DNS answers and DNS over TCP in the local container, as in the
//! pod (issue #19, item 4), through the real `tpd` binary on the sandbox.
//!
//! Namespace `dnsbig` holds a headless Service `big` of 40 ready pods,
//! whose A answer (684 bytes) is over the 512 bytes of UDP without EDNS,
//! and `deployment/front`, which is swapped. From inside the local
//! container:
//! - `getent ahosts big` lists all 40 addresses. glibc asks the sidecar
//!   over UDP without EDNS; the sidecar asks the agent the same way, the
//!   cluster DNS answers truncated (TC), the sidecar asks the agent again
//!   over TCP through the tunnel, and the agent the cluster DNS over TCP;
//!   the sidecar then answers glibc truncated over UDP and whole over TCP;
//! - a query over TCP to 127.0.0.1:53 is answered with all 40, and one
//!   over UDP without EDNS comes back cut, with TC set.
//!
//! Before the sidecar served TCP, `getent ahosts big` found nothing: the
//! truncated answer could not be asked again.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, docker_exec, local, swap_record, tpd_spawn, user_owned, wait_deployment};

const NS: &str = "dnsbig";
const FRONT: &str = "front";
const PODS: usize = 40;

fn manifests() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: big, namespace: {NS}}}
spec:
  replicas: {PODS}
  selector: {{matchLabels: {{app: big}}}}
  template:
    metadata: {{labels: {{app: big}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{name: sleep, image: {busybox}, command: [sleep, "3600"]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: big, namespace: {NS}}}
spec:
  clusterIP: None
  selector: {{app: big}}
  ports: [{{port: 80}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {FRONT}, namespace: {NS}, labels: {{app: {FRONT}}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {FRONT}}}}}
  template:
    metadata: {{labels: {{app: {FRONT}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{name: {FRONT}, image: {echo}, ports: [{{containerPort: 8080}}]}}]
"#,
        busybox = images::BUSYBOX,
        echo = images::ECHO,
    )
}

/// One A query for argv[1] to 127.0.0.1:53 over UDP without EDNS and over
/// TCP (RFC 1035 4.2.2 framing); prints the TC bit, the answer count and
/// the size of each reply.
const QUERY: &str = r#"
import socket, struct, sys
name = sys.argv[1]
q = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
def summary(label, r):
    flags, answers = struct.unpack(">H", r[2:4])[0], struct.unpack(">H", r[6:8])[0]
    print(f"{label} tc={flags >> 9 & 1} answers={answers} bytes={len(r)}")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(q, ("127.0.0.1", 53))
summary("udp", u.recv(65535))
t = socket.create_connection(("127.0.0.1", 53), timeout=5)
t.sendall(struct.pack(">H", len(q)) + q)
f = t.makefile("rb")
(n,) = struct.unpack(">H", f.read(2))
summary("tcp", f.read(n))
"#;

fn ready_addresses(sb: &Sandbox) -> BTreeSet<String> {
    let out = sb
        .kubectl_ok(&["get", "endpoints", "big", "-n", NS, "-o", "jsonpath={.subsets[*].addresses[*].ip}"])
        .unwrap_or_default();
    out.split_whitespace().map(str::to_owned).collect()
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn a_headless_service_of_40_pods_resolves_whole_in_the_local_container() -> anyhow::Result<()> {
    images::ensure()?;
    session::require_tpd_images()?;
    session::binary()?;
    let sb = Sandbox::up()?;
    let mut cleanup = Cleanup::default();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("big.yaml");
    std::fs::write(&file, manifests())?;
    sb.kubectl_ok(&["apply", "-f", &file.to_string_lossy()])?;
    sb.kubectl_ok(&["rollout", "status", &format!("deployment/{FRONT}"), "-n", NS, "--timeout", "120s"])?;
    let started = Instant::now();
    let addresses = loop {
        let a = ready_addresses(&sb);
        if a.len() == PODS {
            break a;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "{} of {PODS} pods ready after 300 s", a.len());
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("{PODS} pods ready after {:?}", started.elapsed());
    let original = user_owned(session::deployment_json(&sb, NS, FRONT)?);

    let dev = format!("tpd-e2e-dns-{}", std::process::id());
    let target = format!("deployment/{FRONT}");
    let started = Instant::now();
    let mut child = tpd_spawn(
        &sb,
        &["run", "-n", NS, "--image", images::DEBIAN, "--name", &dev, "--swap", &target, "--", "sleep", "600"],
    )?;
    let (d, _) = wait_deployment(&sb, NS, FRONT, Duration::from_secs(60), |d| swap_record(d).is_some())?;
    let id = swap_record(&d).and_then(|r| r["session"].as_str().map(str::to_owned)).context("the record's session")?;
    cleanup.sessions.push(id.clone());
    while !docker_exec(&dev, "true").0 {
        if started.elapsed() > Duration::from_secs(120) || child.try_wait()?.is_some() {
            let _ = child.kill();
            let said = session::stderr_of(&mut child);
            anyhow::bail!("the local container never started\ntpd said:\n{said}\n{}", session::session_logs(&sb, &id));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("swapped, local container running {:?} after `tpd run`", started.elapsed());

    // By its short name, through the pod's search path.
    let listed = local(&dev, "getent ahosts big");
    let found: BTreeSet<String> =
        listed.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
    assert_eq!(found, addresses, "getent ahosts big:\n{listed}");

    let name = format!("big.{NS}.svc.cluster.local");
    let seen = local(&dev, &format!("python3 -c '{QUERY}' {name}"));
    eprintln!("{seen}");
    let line = |label: &str| seen.lines().find(|l| l.starts_with(&format!("{label} "))).unwrap_or_default().to_owned();
    let udp = line("udp");
    assert!(udp.starts_with("udp tc=1 "), "cut over UDP without EDNS: {seen}");
    let bytes: usize = udp.rsplit("bytes=").next().unwrap_or_default().parse()?;
    assert!(bytes <= 512, "{seen}");
    assert!(line("tcp").starts_with(&format!("tcp tc=0 answers={PODS} ")), "whole over TCP: {seen}");

    let said = session::interrupt(child)?;
    session::restored(&sb, NS, FRONT, &original, &id).unwrap_or_else(|e| panic!("{e:#}\ntpd said:\n{said}"));
    drop(cleanup);
    Ok(())
}
