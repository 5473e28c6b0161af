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

use tpd_e2e::dns::{self, QUERY};
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;

const NS: &str = "sdns";
const PODS: usize = 40;

/// The headless Service, and a client pod to query from.
fn manifests() -> String {
    format!(
        r#"{service}---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{{name: client, image: {debian}, command: [sleep, "3600"]}}]
"#,
        service = dns::headless_service(NS, PODS),
        debian = images::DEBIAN,
    )
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn a_headless_service_of_40_pods_is_truncated_over_udp_and_whole_over_tcp() -> anyhow::Result<()> {
    images::ensure()?;
    let sb = Sandbox::up()?;
    sb.apply(&manifests())?;
    let addresses = dns::ready_addresses(&sb, NS, PODS)?;
    sb.kubectl_ok(&["wait", "pod/client", "-n", NS, "--for=condition=Ready", "--timeout=120s"])?;
    let name = format!("big.{NS}.svc.cluster.local");
    let exec = |cmd: &[&str]| sb.kubectl_ok(&[&["exec", "client", "-n", NS, "--"], cmd].concat());

    // What a resolver sees on each transport.
    let seen = exec(&["python3", "-c", QUERY, &name])?;
    eprintln!("{seen}");
    let (truncated, answers, bytes) = dns::reply(&seen, "udp").unwrap_or_default();
    assert!(truncated && answers < PODS && bytes <= 512, "plain UDP is cut to what fits 512 bytes: {seen}");
    assert_eq!(
        dns::reply(&seen, "udp-edns").map(|r| (r.0, r.1)),
        Some((false, PODS)),
        "EDNS room takes it whole: {seen}"
    );
    assert_eq!(dns::reply(&seen, "tcp").map(|r| (r.0, r.1)), Some((false, PODS)), "TCP carries it whole: {seen}");

    // glibc falls back to TCP on TC and gets every address.
    let resolved = exec(&["sh", "-c", &format!("getent ahosts {name} | awk '{{print $1}}' | sort -u")])?;
    let resolved: BTreeSet<String> = resolved.lines().map(str::to_owned).collect();
    assert_eq!(resolved, addresses, "getent ahosts lists the {PODS} ready pods");
    Ok(())
}
