//! The agent runs as the container it replaces (issue #19, item 1), through
//! the real `tpd` binary on the sandbox cluster.
//!
//! - `deployment/ident-root` has no securityContext at all, as most images
//!   ship: its container runs as root. An init container fills an emptyDir
//!   and a hostPath (which the node creates root-owned, 0755). The local
//!   container (root) writes, renames into a subdirectory and deletes in
//!   both, and appends to a file of another user (as root may); a second
//!   container of the pod (`watcher`) and, for the hostPath, the node's own
//!   directory show the result, owned as the app would have left it.
//! - `deployment/ident-user` runs as uid 1000, gid 3000, with fsGroup 2000,
//!   a supplementary group and what Pod Security `restricted` asks of a
//!   container. The local container does the same in its fsGroup emptyDir;
//!   the pod sees the new file owned by 1000 and the fsGroup, and the
//!   agent's container in the swapped pod is non-root with the original's
//!   identity and no added privilege.
//!
//! Before the agent took the identity of the container it replaces it ran
//! as uid 65532, and each of these writes failed with "Permission denied".

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{
    self, Cleanup, docker_exec, in_pod, local, swap_record, tpd_spawn, user_owned, wait_deployment,
};
use tpd_wire::names;

const NS: &str = "default";
const ROOT: &str = "ident-root";
const USER: &str = "ident-user";
/// What the init containers leave in each volume: a file to move, a
/// directory to move it into, a file to delete. It runs again in the agent's
/// pod, where the hostPath still holds what the first pod left.
const FILL: &str = "echo from-init > a && mkdir -p b && echo old > old";
/// A file of another user, which a root app may write (CAP_DAC_OVERRIDE).
const THEIRS: &str = "echo theirs > theirs && chown 1234:1234 theirs && chmod 644 theirs";

fn manifests(host_dir: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {ROOT}, labels: {{app: {ROOT}}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {ROOT}}}}}
  template:
    metadata: {{labels: {{app: {ROOT}}}}}
    spec:
      terminationGracePeriodSeconds: 2
      initContainers:
      - name: init
        image: {busybox}
        command: [sh, -c, "cd /payload && {FILL} && {THEIRS} && cd /host && {FILL}"]
        volumeMounts:
        - {{name: payload, mountPath: /payload}}
        - {{name: host, mountPath: /host}}
      containers:
      - name: {ROOT}
        image: {echo}
        ports: [{{containerPort: 8080}}]
        volumeMounts:
        - {{name: payload, mountPath: /payload}}
        - {{name: host, mountPath: /host}}
      - name: watcher
        image: {debian}
        command: [sleep, infinity]
        volumeMounts:
        - {{name: payload, mountPath: /payload}}
        - {{name: host, mountPath: /host}}
      volumes:
      - {{name: payload, emptyDir: {{}}}}
      - {{name: host, hostPath: {{path: {host_dir}, type: DirectoryOrCreate}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {USER}, labels: {{app: {USER}}}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {USER}}}}}
  template:
    metadata: {{labels: {{app: {USER}}}}}
    spec:
      terminationGracePeriodSeconds: 2
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        runAsGroup: 3000
        fsGroup: 2000
        supplementalGroups: [4000]
        seccompProfile: {{type: RuntimeDefault}}
      hostname: api-0
      subdomain: workers
      hostAliases: [{{ip: 10.1.2.3, hostnames: [db.internal, cache.internal]}}]
      dnsConfig:
        searches: [corp.example]
        options: [{{name: ndots, value: "2"}}, {{name: edns0}}]
      initContainers:
      - name: init
        image: {busybox}
        command: [sh, -c, "cd /data && {FILL}"]
        volumeMounts: [{{name: data, mountPath: /data}}]
      containers:
      - name: {USER}
        image: {echo}
        ports: [{{containerPort: 8080}}]
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {{drop: [ALL]}}
        volumeMounts: [{{name: data, mountPath: /data}}]
      - name: watcher
        image: {debian}
        command: [sleep, infinity]
        volumeMounts: [{{name: data, mountPath: /data}}]
      volumes:
      - {{name: data, emptyDir: {{}}}}
"#,
        busybox = images::BUSYBOX,
        echo = images::ECHO,
        debian = images::DEBIAN,
    )
}

/// A swap of `deployment` running `sleep` in a local container named `dev`.
struct Swapped {
    child: Child,
    session: String,
    pod: String,
    dev: String,
}

fn swap(sb: &Sandbox, cleanup: &mut Cleanup, deployment: &str) -> anyhow::Result<Swapped> {
    let dev = format!("tpd-e2e-{deployment}-{}", std::process::id());
    let target = format!("deployment/{deployment}");
    let started = Instant::now();
    let child =
        tpd_spawn(sb, &["run", "--image", images::DEBIAN, "--name", &dev, "--swap", &target, "--", "sleep", "600"])?;
    let (d, _) = wait_deployment(sb, NS, deployment, Duration::from_secs(60), |d| swap_record(d).is_some())?;
    let session = swap_record(&d)
        .and_then(|r| r["session"].as_str().map(str::to_owned))
        .context("the swap record names its session")?;
    cleanup.sessions.push(session.clone());
    // tpd starts the developer's container once the volumes are mounted.
    let mut child = child;
    while !docker_exec(&dev, "true").0 {
        if started.elapsed() > Duration::from_secs(120) || child.try_wait()?.is_some() {
            let _ = child.kill();
            let said = session::stderr_of(&mut child);
            let pods = sb.kubectl_ok(&["describe", "pods", "-l", &format!("app={deployment}")]).unwrap_or_default();
            anyhow::bail!(
                "the developer's container never started\ntpd said:\n{said}\n{}\n{pods}",
                session::session_logs(sb, &session)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let selector = format!("app={deployment},{}={session}", names::LABEL_SESSION);
    let pod = sb.kubectl_ok(&["get", "pods", "-l", &selector, "-o", "jsonpath={.items[0].metadata.name}"])?;
    anyhow::ensure!(!pod.is_empty(), "no pod of session {session}");
    eprintln!("{deployment}: swapped, local container running {:?} after `tpd run`", started.elapsed());
    Ok(Swapped { child, session, pod, dev })
}

/// Ends the session with Ctrl-C and waits until the Deployment is restored.
fn end(sb: &Sandbox, s: Swapped, deployment: &str, original: &Value) {
    let said = session::interrupt(s.child).unwrap();
    session::restored(sb, NS, deployment, original, &s.session).unwrap_or_else(|e| panic!("{e:#}\ntpd said:\n{said}"));
}

/// Writes, renames into a subdirectory and deletes in `dir` from the
/// developer's container, as a root app does.
fn write_rename_delete(dev: &str, dir: &str) {
    local(dev, &format!("echo from-laptop > {dir}/f"));
    local(dev, &format!("mv {dir}/a {dir}/b/"));
    local(dev, &format!("rm {dir}/old"));
    local(dev, &format!("echo appended >> {dir}/b/a"));
    assert_eq!(local(dev, &format!("cat {dir}/f")), "from-laptop");
}

/// What the pod sees in `dir` after [`write_rename_delete`]: `f`'s owner,
/// `b/a` and whether `a` and `old` are gone.
fn pod_view(sb: &Sandbox, pod: &str, dir: &str) -> String {
    in_pod(
        sb,
        pod,
        &format!(
            "cd {dir} && echo \"f=$(cat f) owner=$(stat -c %u:%g f)\"; echo \"b/a=$(cat b/a | tr '\\n' ' ')\"; \
             ls -A"
        ),
    )
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["containers"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn the_agent_runs_as_the_container_it_replaces() -> anyhow::Result<()> {
    session::prerequisites()?;
    let host = tempfile::tempdir()?;
    // The node creates it (DirectoryOrCreate): root-owned, 0755.
    let host_dir = host.path().join("hostpath");
    let sb = Sandbox::up()?;
    let mut cleanup = Cleanup::default();
    sb.apply(&manifests(&host_dir.to_string_lossy()))?;
    for d in [ROOT, USER] {
        sb.rolled_out(NS, d)?;
    }

    // Root: an emptyDir the init container filled, and a hostPath.
    let original = user_owned(session::deployment_json(&sb, NS, ROOT)?);
    let s = swap(&sb, &mut cleanup, ROOT)?;
    for (dir, left) in [("/payload", "b\nf\ntheirs"), ("/host", "b\nf")] {
        write_rename_delete(&s.dev, dir);
        assert_eq!(
            pod_view(&sb, &s.pod, dir),
            format!("f=from-laptop owner=0:0\nb/a=from-init appended \n{left}"),
            "what the pod sees in {dir}"
        );
    }
    // Root writes another user's file, as the app could; it stays theirs.
    local(&s.dev, "echo mine >> /payload/theirs");
    assert_eq!(in_pod(&sb, &s.pod, "stat -c %u:%g /payload/theirs; cat /payload/theirs"), "1234:1234\ntheirs\nmine");
    let on_node = |rel: &str| std::fs::read_to_string(host_dir.join(rel)).unwrap_or_else(|e| format!("({e})"));
    assert_eq!((on_node("f"), on_node("b/a")), ("from-laptop\n".into(), "from-init\nappended\n".into()));
    let pod: Value = serde_json::from_str(&sb.kubectl_ok(&["get", "pod", &s.pod, "-o", "json"])?)?;
    let sc = &container(&pod, ROOT)["securityContext"];
    eprintln!("{ROOT}: the agent's securityContext: {sc}");
    assert_eq!(sc["runAsUser"], 0, "a root container's agent runs as root: {sc}");
    assert_ne!(sc["runAsNonRoot"], true, "{sc}");
    // Named as the pod: its hostname, and the cluster's search path.
    assert_eq!(local(&s.dev, "hostname"), s.pod, "the local container's hostname is the agent pod's name");
    let search = format!("search {NS}.svc.cluster.local svc.cluster.local cluster.local");
    assert!(local(&s.dev, "cat /etc/resolv.conf").contains(&search), "{search}");
    end(&sb, s, ROOT, &original);

    // Non-root with fsGroup: the agent keeps the uid, groups and limits.
    let original = user_owned(session::deployment_json(&sb, NS, USER)?);
    let s = swap(&sb, &mut cleanup, USER)?;
    let pod: Value = serde_json::from_str(&sb.kubectl_ok(&["get", "pod", &s.pod, "-o", "json"])?)?;
    let sc = &container(&pod, USER)["securityContext"];
    eprintln!("{USER}: the agent's securityContext: {sc}");
    assert_eq!(
        (&sc["runAsUser"], &sc["runAsGroup"], &sc["runAsNonRoot"]),
        (&Value::from(1000), &Value::from(3000), &Value::from(true)),
        "{sc}"
    );
    assert_eq!(
        (&sc["allowPrivilegeEscalation"], &sc["readOnlyRootFilesystem"], &sc["capabilities"]),
        (&Value::from(false), &Value::from(true), &serde_json::json!({"drop": ["ALL"]})),
        "{sc}"
    );
    // fsGroup and supplementalGroups are the pod's, which the swap keeps.
    let psc = &pod["spec"]["securityContext"];
    assert_eq!((&psc["fsGroup"], &psc["supplementalGroups"]), (&Value::from(2000), &serde_json::json!([4000])));
    // The pod's hostname, hostAliases and dnsConfig, as the kubelet writes them.
    assert_eq!(local(&s.dev, "hostname"), "api-0");
    assert_eq!(local(&s.dev, "getent hosts cache.internal"), "10.1.2.3        cache.internal");
    let resolv = local(&s.dev, "cat /etc/resolv.conf");
    let search = format!("search {NS}.svc.cluster.local svc.cluster.local cluster.local corp.example");
    assert!(resolv.contains(&search) && resolv.contains("options ndots:2 edns0"), "{resolv}");
    write_rename_delete(&s.dev, "/data");
    assert_eq!(
        pod_view(&sb, &s.pod, "/data"),
        "f=from-laptop owner=1000:2000\nb/a=from-init appended \nb\nf",
        "what the pod sees in the fsGroup volume"
    );
    end(&sb, s, USER, &original);
    drop(cleanup);
    Ok(())
}
