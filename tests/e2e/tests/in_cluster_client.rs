//! An in-cluster Kubernetes client (an operator under development, any app
//! using in-cluster config) works in the local container as it does in the
//! pod: the official Python client's `load_incluster_config()` finds
//! `KUBERNETES_SERVICE_HOST`/`PORT`, the service-account token and
//! `ca.crt`, reaches the API server at 10.96.0.1:443 through the tunnel,
//! verifies its certificate and lists pods. The sandbox serves that
//! address over HTTPS and, like kube-apiserver, answers 401 to a request
//! without a token it issued.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, tpd_spawn, user_owned};

const NS: &str = "default";
const NAME: &str = "operator";

/// Lists the namespace's pods with in-cluster config; prints their names.
const LIST_PODS: &str = "from kubernetes import client, config
config.load_incluster_config()
for p in client.CoreV1Api().list_namespaced_pod('default').items:
    print('pod', p.metadata.name)
";

fn manifest() -> String {
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
      # `sleep` as PID 1 ignores SIGTERM: without this the swap's rollout
      # waits 30 s for the old pod.
      terminationGracePeriodSeconds: 1
      containers:
      - name: {NAME}
        image: {debian}
        command: [sleep, "3600"]
"#,
        debian = images::DEBIAN,
    )
}

/// `sh -c SCRIPT` in the pod's container; its stdout.
fn in_pod(sb: &Sandbox, pod: &str, script: &str) -> anyhow::Result<String> {
    Ok(sb.kubectl_ok(&["exec", pod, "--", "sh", "-c", script])?.trim().to_owned())
}

fn pods_listed(output: &str) -> Vec<&str> {
    output.lines().filter_map(|l| l.strip_prefix("pod ")).collect()
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn an_in_cluster_client_lists_pods_from_the_pod_and_from_the_local_container() -> anyhow::Result<()> {
    session::prerequisites()?;
    let sb = Sandbox::up()?;
    let mut cleanup = Cleanup::default();
    sb.apply(&manifest())?;
    sb.rolled_out(NS, NAME)?;
    let original = user_owned(session::deployment_json(&sb, NS, NAME)?);
    let pod =
        sb.kubectl_ok(&["get", "pods", "-l", &format!("app={NAME}"), "-o", "jsonpath={.items[0].metadata.name}"])?;

    // In the pod: the client works, and the secure port wants the token.
    let listed = in_pod(&sb, &pod, &format!("python3 -c \"{LIST_PODS}\""))?;
    assert!(pods_listed(&listed).contains(&pod.as_str()), "the pod lists itself:\n{listed}");
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let anonymous = in_pod(
        &sb,
        &pod,
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --cacert {sa}/ca.crt https://kubernetes.default.svc/api/v1/namespaces/default/pods"
        ),
    )?;
    assert_eq!(anonymous, "401", "a request without the token is refused");
    let token = sb.kubectl_ok(&["create", "token", "default"])?;
    let with_token = in_pod(
        &sb,
        &pod,
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}}' --cacert {sa}/ca.crt -H 'Authorization: Bearer {}' https://kubernetes.default.svc/api/v1/namespaces/default/pods",
            token.trim()
        ),
    )?;
    assert_eq!(with_token, "200", "a token from `kubectl create token` is accepted");

    // In the local container of a swap of that pod: the same program.
    let target = format!("deployment/{NAME}");
    let child =
        tpd_spawn(&sb, &["run", "--image", images::DEBIAN, "--swap", &target, "--", "python3", "-c", LIST_PODS])?;
    let (_, id) = session::wait_swapped(&sb, NS, NAME, Duration::from_secs(60))?;
    cleanup.sessions.push(id.clone());
    let out = session::output_within(child, Duration::from_secs(120))?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the in-cluster client in the local container:\n{stdout}\n{stderr}");
    assert!(pods_listed(&stdout).iter().any(|p| p.starts_with(NAME)), "it lists the swapped pod:\n{stdout}\n{stderr}");
    eprintln!("the local container's in-cluster client listed: {:?}", pods_listed(&stdout));
    session::restored(&sb, NS, NAME, &original, &id)?;
    Ok(())
}
