//! A swap in a namespace that enforces Pod Security `restricted` (issue
//! #19, item 7), through the real `tpd` binary on the sandbox, which now
//! enforces it as kube-apiserver does:
//!
//! - a root, privileged `kubectl run` in the namespace is refused with
//!   kube-apiserver's message, and a Deployment of such pods is stored but
//!   its ReplicaSet's pods are refused (`FailedCreate`), so Pod Security
//!   is really in force; a warn label and the labels themselves are
//!   answered as kube-apiserver answers them;
//! - `deployment/psa-app`, which complies with `restricted`, is swapped:
//!   the agent stands in with the app's identity and no more privilege, so
//!   its pod is admitted; a client in the cluster reaches the developer's
//!   container through the Service; after Ctrl-C the Deployment is as it
//!   was and its own pods run again.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::Value;

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, docker_exec, tpd_spawn, user_owned, wait_deployment};
use tpd_wire::names;

const NS: &str = "psa";
const APP: &str = "psa-app";

fn manifests() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels:
    pod-security.kubernetes.io/enforce: restricted
    pod-security.kubernetes.io/enforce-version: latest
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {APP}, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {APP}}}}}
  template:
    metadata: {{labels: {{app: {APP}}}}}
    spec:
      terminationGracePeriodSeconds: 2
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        runAsGroup: 1000
        seccompProfile: {{type: RuntimeDefault}}
      containers:
      - name: {APP}
        image: {echo}
        ports: [{{containerPort: 8080}}]
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {{drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {{name: {APP}, namespace: {NS}}}
spec:
  selector: {{app: {APP}}}
  ports: [{{port: 80, targetPort: 8080}}]
"#,
        echo = images::ECHO,
    )
}

/// What kube-apiserver lists for a container `name` that sets nothing but
/// `privileged: true`, against `restricted`.
fn refused_privileged(name: &str) -> String {
    format!(
        r#"pods "{name}" is forbidden: violates PodSecurity "restricted:latest": privileged (container "{name}" must not set securityContext.privileged=true), allowPrivilegeEscalation != false (container "{name}" must set securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (container "{name}" must set securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod or container "{name}" must set securityContext.runAsNonRoot=true), seccompProfile (pod or container "{name}" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")"#
    )
}

fn pods_of(sb: &Sandbox, selector: &str) -> String {
    sb.kubectl_ok(&["get", "pods", "-n", NS, "-l", selector, "-o", "jsonpath={.items[*].metadata.name}"])
        .unwrap_or_default()
}

/// Pod Security is in force: direct pods and a ReplicaSet's are refused.
fn refusals(sb: &Sandbox) -> anyhow::Result<()> {
    let out = sb
        .kubectl()
        .args(["run", "rooted", "-n", NS, "--image", images::BUSYBOX, "--privileged", "--restart=Never"])
        .args(["--", "sleep", "60"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a privileged root pod must be refused");
    assert_eq!(stderr.trim(), format!("Error from server (Forbidden): {}", refused_privileged("rooted")));

    // A Deployment is stored, with a warning only where a warn label asks
    // for one, as kube-apiserver; its ReplicaSet's pods are refused and the
    // Deployment says why.
    sb.kubectl_ok(&["label", "namespace", NS, "pod-security.kubernetes.io/warn=baseline"])?;
    let out = sb.kubectl().args(["create", "deployment", "rooted", "-n", NS, "--image", images::BUSYBOX]).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "baseline has nothing to say of a plain busybox");
    let out = sb
        .kubectl()
        .args(["create", "deployment", "hosted", "-n", NS, "--image", images::BUSYBOX])
        .args(["--dry-run=client", "-o", "json"])
        .output()?;
    let mut hosted: Value = serde_json::from_slice(&out.stdout)?;
    hosted["spec"]["template"]["spec"]["hostNetwork"] = Value::from(true);
    let file = std::env::temp_dir().join(format!("tpd-e2e-hosted-{}.json", std::process::id()));
    std::fs::write(&file, hosted.to_string())?;
    let out = sb.kubectl().args(["create", "-f", &file.to_string_lossy()]).output()?;
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        r#"Warning: would violate PodSecurity "baseline:latest": host namespaces (hostNetwork)"#
    );
    sb.kubectl_ok(&["delete", "deployment", "hosted", "-n", NS])?;
    sb.kubectl_ok(&["label", "namespace", NS, "pod-security.kubernetes.io/warn-"])?;
    let (d, waited) = wait_deployment(sb, NS, "rooted", Duration::from_secs(30), |d| {
        d["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "ReplicaFailure")
    })?;
    let failure = d["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "ReplicaFailure").unwrap();
    eprintln!("deployment/rooted: {failure} after {waited:?}");
    assert_eq!(failure["reason"], "FailedCreate");
    let message = failure["message"].as_str().unwrap_or_default();
    assert!(
        message
            .contains(r#"is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false"#),
        "{message}"
    );
    let events =
        sb.kubectl_ok(&["get", "events", "-n", NS, "--field-selector", "reason=FailedCreate", "-o", "name"])?;
    assert!(!events.trim().is_empty(), "a FailedCreate event");
    assert_eq!(pods_of(sb, "app=rooted"), "", "no pod of the refused template exists");
    sb.kubectl_ok(&["delete", "deployment", "rooted", "-n", NS])?;

    // Labels that are no level are refused; a stricter level names the
    // running pods it would refuse, which keep running.
    let out = sb
        .kubectl()
        .args(["label", "namespace", NS, "pod-security.kubernetes.io/enforce=strict", "--overwrite"])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(r#"Namespace "psa" is invalid: metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: "strict": must be one of privileged, baseline, restricted"#),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sb.kubectl_ok(&["create", "namespace", "later"])?;
    sb.kubectl_ok(&["run", "old", "-n", "later", "--image", images::BUSYBOX, "--", "sleep", "600"])?;
    let out =
        sb.kubectl().args(["label", "namespace", "later", "pod-security.kubernetes.io/enforce=restricted"]).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "Warning: existing pods in namespace \"later\" violate the new PodSecurity enforce level \"restricted:latest\"\n\
         Warning: old: allowPrivilegeEscalation != false, unrestricted capabilities, runAsNonRoot != true, seccompProfile"
    );
    sb.kubectl_ok(&["delete", "namespace", "later"])?;
    Ok(())
}

/// `curl` from a pod in the cluster (the default namespace, which enforces
/// nothing) to `url`; its output.
fn curl_from_cluster(sb: &Sandbox, pod: &str, url: &str) -> anyhow::Result<String> {
    let (phase, out) = session::run_pod(sb, pod, images::DEBIAN, &["curl", "-sS", "--max-time", "10", url])?;
    anyhow::ensure!(phase == "Succeeded", "curl {url} from the cluster: {phase}: {out}");
    Ok(out.trim().to_owned())
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn a_restricted_deployment_is_swapped_and_restored() -> anyhow::Result<()> {
    session::prerequisites()?;
    let sb = Sandbox::up()?;
    let mut cleanup = Cleanup::default();
    sb.apply(&manifests())?;
    sb.rolled_out(NS, APP)?;
    refusals(&sb)?;

    let original = user_owned(session::deployment_json(&sb, NS, APP)?);
    let dev = format!("tpd-e2e-psa-{}", std::process::id());
    let target = format!("deployment/{APP}");
    let serve = "echo from-laptop > /tmp/marker && cd /tmp && exec python3 -m http.server 8080";
    let started = Instant::now();
    let mut child = tpd_spawn(
        &sb,
        &["run", "-n", NS, "--image", images::DEBIAN, "--name", &dev, "--swap", &target, "--", "sh", "-c", serve],
    )?;
    let (_, id) = session::wait_swapped(&sb, NS, APP, Duration::from_secs(60))?;
    cleanup.sessions.push(id.clone());
    // tpd starts the developer's container only once the agent answers.
    while !docker_exec(&dev, "true").0 {
        if started.elapsed() > Duration::from_secs(120) || child.try_wait()?.is_some() {
            let _ = child.kill();
            let said = session::stderr_of(&mut child);
            let rs = sb.kubectl_ok(&["describe", "replicasets", "-n", NS]).unwrap_or_default();
            anyhow::bail!("the swap never started\ntpd said:\n{said}\n{}\n{rs}", session::session_logs(&sb, &id));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{APP}: swapped in a restricted namespace after {:?}", started.elapsed());

    // The agent's pod was admitted under `restricted`, with the app's identity.
    let selector = format!("app={APP},{}={id}", names::LABEL_SESSION);
    let pod = pods_of(&sb, &selector);
    anyhow::ensure!(!pod.is_empty(), "no agent pod of session {id}");
    let pod: Value = serde_json::from_str(&sb.kubectl_ok(&["get", "pod", &pod, "-n", NS, "-o", "json"])?)?;
    let sc = &pod["spec"]["containers"][0]["securityContext"];
    eprintln!("the agent's securityContext: {sc}");
    assert_eq!((&sc["runAsUser"], &sc["runAsNonRoot"]), (&Value::from(1000), &Value::from(true)), "{sc}");

    // The cluster reaches the developer's container through the Service.
    let url = format!("http://{APP}.{NS}.svc.cluster.local/marker");
    let mut seen = String::new();
    for attempt in 0..10 {
        match curl_from_cluster(&sb, &format!("psa-client-{attempt}"), &url) {
            Ok(out) => {
                seen = out;
                break;
            }
            Err(e) => {
                eprintln!("{e:#}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    assert_eq!(seen, "from-laptop", "the Service leads to the local container");

    let said = session::interrupt(child)?;
    session::restored(&sb, NS, APP, &original, &id).map_err(|e| e.context(format!("tpd said:\n{said}")))?;
    sb.rolled_out(NS, APP)?;
    assert!(!pods_of(&sb, &format!("app={APP}")).is_empty(), "the app's own pods run again");
    drop(cleanup);
    Ok(())
}

/// A namespace labelled `restricted` after its root Deployment started: the
/// agent, which runs as that root container did, would be refused too. tpd
/// asks the API server first (a dry-run create of the agent's pod) and
/// refuses with its message, exits non-zero, and changes nothing: the
/// running pod keeps running.
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn a_swap_the_namespace_refuses_is_refused_before_anything_changes() -> anyhow::Result<()> {
    session::prerequisites()?;
    let sb = Sandbox::up()?;
    sb.kubectl_ok(&["create", "namespace", "late"])?;
    sb.kubectl_ok(&[
        "create",
        "deployment",
        "rooted",
        "-n",
        "late",
        "--image",
        images::BUSYBOX,
        "--",
        "sleep",
        "3600",
    ])?;
    sb.rolled_out("late", "rooted")?;
    sb.kubectl_ok(&["label", "namespace", "late", "pod-security.kubernetes.io/enforce=restricted"])?;
    let original = user_owned(session::deployment_json(&sb, "late", "rooted")?);

    let running = || sb.kubectl_ok(&["get", "pods", "-n", "late", "-o", "jsonpath={.items[*].metadata.name}"]);
    let before = running()?;

    let args = ["run", "-n", "late", "--image", images::DEBIAN, "--swap", "deployment/rooted", "--", "sleep", "60"];
    let started = Instant::now();
    let out = session::output_within(tpd_spawn(&sb, &args)?, Duration::from_secs(60))?;
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("tpd ended after {:?}:\n{said}", started.elapsed());
    assert!(!out.status.success(), "tpd must fail: {said}");
    assert!(said.contains(r#"namespace "late" refuses the agent pod"#), "{said}");
    assert!(said.contains(r#"violates PodSecurity "restricted:latest""#), "{said}");
    assert!(said.contains("nothing was changed"), "{said}");
    let after = user_owned(session::deployment_json(&sb, "late", "rooted")?);
    assert_eq!(after, original, "the Deployment is as it was");
    assert_eq!(running()?, before, "the running pod was left running");
    Ok(())
}
