//! The sandbox's cluster DNS answers as CoreDNS does where resolvers notice
//! (issue #19, item 5): a headless Service with 40 ready pods has an
//! answer too large for plain UDP (684 bytes), so over UDP it comes back
//! cut to 512 bytes with TC set, unless the query's EDNS record offers
//! room, and whole over TCP on the same address. glibc retries over TCP on
//! TC, so `getent ahosts` in a pod lists all 40.
//!
//! Before the sandbox truncated, the UDP answer went out whole at 684
//! bytes with no TC, which no real cluster sends a client without EDNS.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;

const NS: &str = "sdns";
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
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: client, image: {debian}, command: [sleep, "3600"]}}]
"#,
        busybox = images::BUSYBOX,
        debian = images::DEBIAN,
    )
}

/// One A query for argv[1] to the pod's nameserver over UDP without EDNS,
/// over UDP with EDNS (4096 bytes), and over TCP (RFC 1035 4.2.2 framing);
/// prints the TC bit, the answer count and the size of each reply.
const QUERY: &str = r#"
import socket, struct, sys
name = sys.argv[1]
server = next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
def query(edns):
    q = struct.pack(">6H", 0x1234, 0x0100, 1, 0, 0, 1 if edns else 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    return q + (b"\0" + struct.pack(">HHIH", 41, 4096, 0, 0) if edns else b"")
def summary(label, r):
    flags, answers = struct.unpack(">H", r[2:4])[0], struct.unpack(">H", r[6:8])[0]
    print(f"{label} tc={flags >> 9 & 1} answers={answers} bytes={len(r)}")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
for label, edns in (("udp", False), ("udp-edns", True)):
    u.sendto(query(edns), (server, 53))
    summary(label, u.recv(65535))
t = socket.create_connection((server, 53), timeout=5)
q = query(False)
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
fn a_headless_service_of_40_pods_is_truncated_over_udp_and_whole_over_tcp() -> anyhow::Result<()> {
    images::ensure()?;
    let sb = Sandbox::up()?;
    sb.apply(&manifests())?;

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
    sb.kubectl_ok(&["wait", "pod/client", "-n", NS, "--for=condition=Ready", "--timeout=120s"])?;
    let name = format!("big.{NS}.svc.cluster.local");
    let exec = |cmd: &[&str]| sb.kubectl_ok(&[&["exec", "client", "-n", NS, "--"], cmd].concat());

    // What a resolver sees on each transport.
    let seen = exec(&["python3", "-c", QUERY, &name])?;
    eprintln!("{seen}");
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 3, "{seen}");
    let udp: Vec<usize> = numbers(lines[0]);
    assert!(lines[0].starts_with("udp tc=1 "), "plain UDP is truncated: {seen}");
    assert!(udp[1] < PODS && udp[2] <= 512, "cut to what fits 512 bytes: {seen}");
    assert!(lines[1].starts_with(&format!("udp-edns tc=0 answers={PODS} ")), "EDNS room takes it whole: {seen}");
    assert!(lines[2].starts_with(&format!("tcp tc=0 answers={PODS} ")), "TCP carries it whole: {seen}");

    // glibc falls back to TCP on TC and gets every address.
    let resolved = exec(&["sh", "-c", &format!("getent ahosts {name} | awk '{{print $1}}' | sort -u")])?;
    let resolved: BTreeSet<String> = resolved.lines().map(str::to_owned).collect();
    assert_eq!(resolved, addresses, "getent ahosts lists the {PODS} ready pods");
    Ok(())
}

/// The numbers in `tcp tc=0 answers=40 bytes=684`.
fn numbers(line: &str) -> Vec<usize> {
    line.split_whitespace().filter_map(|w| w.split_once('=')).filter_map(|(_, n)| n.parse().ok()).collect()
}
