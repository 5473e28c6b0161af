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

use tpd_e2e::dns::{self, QUERY};
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, local, user_owned};

const NS: &str = "dnsbig";
const FRONT: &str = "front";
const PODS: usize = 40;

/// The headless Service, and the Deployment that is swapped.
fn manifests() -> String {
    format!(
        r#"{service}---
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
        service = dns::headless_service(NS, PODS),
        echo = images::ECHO,
    )
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn a_headless_service_of_40_pods_resolves_whole_in_the_local_container() -> anyhow::Result<()> {
    session::prerequisites()?;
    let sb = Sandbox::up()?;
    let mut cleanup = Cleanup::default();
    sb.apply(&manifests())?;
    sb.rolled_out(NS, FRONT)?;
    let addresses = dns::ready_addresses(&sb, NS, PODS)?;
    let original = user_owned(session::deployment_json(&sb, NS, FRONT)?);

    let dev = format!("tpd-e2e-dns-{}", std::process::id());
    let target = format!("deployment/{FRONT}");
    let args = ["run", "-n", NS, "--image", images::DEBIAN, "--name", &dev, "--swap", &target, "--", "sleep", "600"];
    let (child, id) = session::start_swapped(&sb, &mut cleanup, &args, (NS, FRONT, &dev))?;

    // By its short name, through the pod's search path.
    let listed = local(&dev, "getent ahosts big");
    let found: BTreeSet<String> =
        listed.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
    assert_eq!(found, addresses, "getent ahosts big:\n{listed}");

    // Straight to the sidecar on 127.0.0.1:53.
    let name = format!("big.{NS}.svc.cluster.local");
    let seen = local(&dev, &format!("python3 -c '{QUERY}' {name} 127.0.0.1"));
    eprintln!("{seen}");
    let (truncated, _, bytes) = dns::reply(&seen, "udp").unwrap_or_default();
    assert!(truncated && bytes <= 512, "cut over UDP without EDNS: {seen}");
    assert_eq!(dns::reply(&seen, "udp-edns").map(|r| (r.0, r.1)), Some((false, PODS)), "whole with EDNS: {seen}");
    assert_eq!(dns::reply(&seen, "tcp").map(|r| (r.0, r.1)), Some((false, PODS)), "whole over TCP: {seen}");

    let said = session::interrupt(child)?;
    session::restored(&sb, NS, FRONT, &original, &id).unwrap_or_else(|e| panic!("{e:#}\ntpd said:\n{said}"));
    drop(cleanup);
    Ok(())
}
