//! The sandbox's API server and controllers as real clients see them:
//! kube-rs (errors, replace conflicts, the three patch kinds, watch, scale,
//! garbage collection, port-forward, await_condition on a rollout) and
//! kubectl (the issue's command list, run as a developer would).
//!
//! One instance serves every step (one sandbox per machine at a time), so the
//! steps run in order inside one test. Steps marked NODE need running pods
//! (the sandbox node); they run for real, nothing is skipped.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;

fn api_error(e: kube::Error) -> Result<kube::core::Status> {
    match e {
        kube::Error::Api(status) => Ok(*status),
        other => bail!("expected an API error, got {other}"),
    }
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"step": "errors"}}, "data": {"k": "v"}}))
        .expect("configmap")
}

fn deployment(name: &str, replicas: i32, containers: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": containers}}}
    }))
    .expect("deployment")
}

/// 404, 409 AlreadyExists and Conflict, 422 with causes, ServiceCIDR.
async fn errors_like_the_real_api(client: &kube::Client) -> Result<()> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let e = api_error(cms.get("nope").await.expect_err("missing configmap"))?;
    ensure!(e.code == 404 && e.reason == "NotFound", "get missing: {e:?}");

    let created = cms.create(&PostParams::default(), &config_map("c1")).await?;
    let e = api_error(cms.create(&PostParams::default(), &config_map("c1")).await.expect_err("dup"))?;
    ensure!(e.code == 409 && e.reason == "AlreadyExists", "duplicate create: {e:?}");

    // A replace from a stale read loses with 409 Conflict.
    let mut first = created.clone();
    first.data = Some([("k".to_owned(), "first".to_owned())].into());
    cms.replace("c1", &PostParams::default(), &first).await?;
    let mut stale = created;
    stale.data = Some([("k".to_owned(), "stale".to_owned())].into());
    let e = api_error(cms.replace("c1", &PostParams::default(), &stale).await.expect_err("stale replace"))?;
    ensure!(e.code == 409 && e.reason == "Conflict", "stale replace: {e:?}");

    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let e = api_error(
        deps.create(&PostParams::default(), &deployment("empty", 1, json!([]))).await.expect_err("no containers"),
    )?;
    ensure!(e.code == 422 && e.reason == "Invalid", "no containers: {e:?}");
    ensure!(e.message.contains("spec.template.spec.containers: Required value"), "message: {}", e.message);
    let mut mismatched = deployment("mismatch", 1, json!([{"name": "c", "image": images::ECHO}]));
    mismatched.spec.as_mut().expect("spec").selector.match_labels =
        Some([("app".to_owned(), "other".to_owned())].into());
    let e = api_error(deps.create(&PostParams::default(), &mismatched).await.expect_err("selector"))?;
    ensure!(e.code == 422 && e.message.contains("`selector` does not match template `labels`"), "selector: {e:?}");
    let e = api_error(cms.create(&PostParams::default(), &config_map("Bad_Name")).await.expect_err("bad name"))?;
    ensure!(e.code == 422 && e.message.contains("metadata.name: Invalid value: \"Bad_Name\""), "bad name: {e:?}");

    // The service range, discovered as on a real cluster.
    let cidrs: Api<k8s_openapi::api::networking::v1::ServiceCIDR> = Api::all(client.clone());
    let cidr = cidrs.get("kubernetes").await?;
    let ranges = cidr.spec.and_then(|s| s.cidrs).unwrap_or_default();
    ensure!(ranges == ["10.96.0.0/16"], "ServiceCIDR: {ranges:?}");
    let svcs: Api<Service> = Api::namespaced(client.clone(), "default");
    let outside: Service = serde_json::from_value(json!({"metadata": {"name": "outside"},
        "spec": {"clusterIP": "10.0.0.5", "ports": [{"port": 80}]}}))?;
    let e = api_error(svcs.create(&PostParams::default(), &outside).await.expect_err("outside range"))?;
    ensure!(e.code == 422 && e.message.contains("The range of valid IPs is 10.96.0.0/16"), "clusterIP: {e:?}");
    Ok(())
}

/// JSON patch, merge patch and strategic merge patch of PodSpec lists.
async fn patches(client: &kube::Client) -> Result<()> {
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let two = json!([
        {"name": "app", "image": images::ECHO, "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
        {"name": "side", "image": images::BUSYBOX, "command": ["sleep", "3600"]}
    ]);
    deps.create(&PostParams::default(), &deployment("patched", 0, two)).await?;
    let pp = PatchParams::default();
    deps.patch("patched", &pp, &Patch::Merge(json!({"metadata": {"labels": {"tier": "web"}}}))).await?;
    let json_patch: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/replicas", "value": 0}]))?;
    deps.patch("patched", &pp, &Patch::<()>::Json(json_patch)).await?;
    let smp = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "app", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}
    ]}}}});
    let d = deps.patch("patched", &pp, &Patch::Strategic(smp)).await?;
    let spec = d.spec.and_then(|s| s.template.spec).context("pod spec")?;
    ensure!(spec.containers.len() == 2, "strategic merge kept both containers: {:?}", spec.containers);
    let env: Vec<(String, Option<String>)> =
        spec.containers[0].env.clone().unwrap_or_default().into_iter().map(|e| (e.name, e.value)).collect();
    let want = [("A", "1"), ("B", "3"), ("C", "4")].map(|(n, v)| (n.to_owned(), Some(v.to_owned())));
    ensure!(env == want, "env merged by name: {env:?}");
    let labels = d.metadata.labels.unwrap_or_default();
    ensure!(labels.get("tier").map(String::as_str) == Some("web"), "merge patch label: {labels:?}");
    deps.delete("patched", &DeleteParams::default()).await?;
    Ok(())
}

/// A watch from a list's resourceVersion sees ADDED, MODIFIED and DELETED.
async fn watch_from_a_resource_version(client: &kube::Client) -> Result<()> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let list = cms.list(&ListParams::default().labels("step=watch")).await?;
    let rv = list.metadata.resource_version.context("list resourceVersion")?;
    let mut stream = cms.watch(&WatchParams::default().labels("step=watch").timeout(20), &rv).await?.boxed();
    let mut cm = config_map("watched");
    cm.metadata.labels = Some([("step".to_owned(), "watch".to_owned())].into());
    cms.create(&PostParams::default(), &cm).await?;
    cms.patch("watched", &PatchParams::default(), &Patch::Merge(json!({"data": {"k": "2"}}))).await?;
    cms.delete("watched", &DeleteParams::default()).await?;
    // Not in the selector: must not show up.
    cms.create(&PostParams::default(), &config_map("unwatched")).await?;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), stream.try_next())
            .await
            .context("watch event timed out")??;
        match ev.context("watch ended early")? {
            WatchEvent::Added(c) => seen.push(("ADDED", c.metadata.name.unwrap_or_default())),
            WatchEvent::Modified(c) => seen.push(("MODIFIED", c.metadata.name.unwrap_or_default())),
            WatchEvent::Deleted(c) => seen.push(("DELETED", c.metadata.name.unwrap_or_default())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => bail!("watch error: {e:?}"),
        }
    }
    let want: Vec<(&str, String)> =
        ["ADDED", "MODIFIED", "DELETED"].into_iter().map(|t| (t, "watched".to_owned())).collect();
    ensure!(seen == want, "watch events: {seen:?}");
    Ok(())
}

/// NODE. A Deployment rolls out (await_condition), scales through the scale
/// subresource, serves through a port-forward, and its ReplicaSets and pods
/// are collected when it is deleted.
async fn rollout_scale_portforward_gc(client: &kube::Client) -> Result<()> {
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    deps.create(
        &PostParams::default(),
        &deployment("kecho", 2, json!([{"name": "echo", "image": images::ECHO, "ports": [{"containerPort": 8080}]}])),
    )
    .await?;
    let done = await_condition(deps.clone(), "kecho", conditions::is_deployment_completed());
    tokio::time::timeout(Duration::from_secs(60), done).await.context("rollout did not complete in 60 s")??;
    let ready = pods.list(&ListParams::default().labels("app=kecho")).await?;
    ensure!(ready.items.len() == 2, "two pods: {}", ready.items.len());

    let scale = deps.get_scale("kecho").await?;
    ensure!(scale.spec.and_then(|s| s.replicas) == Some(2), "scale subresource reads 2");
    deps.patch_scale("kecho", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 1}}))).await?;
    wait_for(Duration::from_secs(30), || async {
        let n = pods.list(&ListParams::default().labels("app=kecho")).await?.items.len();
        Ok(n == 1)
    })
    .await
    .context("scaling to 1 left one pod")?;

    let pod = pods.list(&ListParams::default().labels("app=kecho")).await?.items.remove(0);
    let name = pod.metadata.name.clone().context("pod name")?;
    let mut pf = pods.portforward(&name, &[8080]).await?;
    let mut conn = pf.take_stream(8080).context("port 8080 stream")?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut body))
        .await
        .context("port-forward read timed out")??;
    let body = String::from_utf8_lossy(&body);
    ensure!(body.contains(&format!("hello from {name}")), "port-forwarded answer: {body}");
    // A kubelet's port-forward dials localhost inside the pod's network namespace.
    ensure!(body.contains("client=127.0.0.1:"), "a port-forward lands on the pod's loopback: {body}");
    drop(conn);
    pf.abort();

    deps.delete("kecho", &DeleteParams::default()).await?;
    let rss: Api<k8s_openapi::api::apps::v1::ReplicaSet> = Api::namespaced(client.clone(), "default");
    wait_for(Duration::from_secs(30), || async {
        let left = rss.list(&ListParams::default().labels("app=kecho")).await?.items.len()
            + pods.list(&ListParams::default().labels("app=kecho")).await?.items.len();
        Ok(left == 0)
    })
    .await
    .context("deleting the deployment collected its replicasets and pods")
}

async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("not reached within {limit:?}")
}

const APP_YAML: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data: {greeting: hello}
---
apiVersion: v1
kind: Secret
metadata: {name: web-secret}
stringData: {password: s3cret}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      initContainers:
      - name: init
        image: tpd-test/busybox:latest
        command: ["sh", "-c", "echo init-ran > /work/init.txt"]
        volumeMounts: [{name: work, mountPath: /work}]
      containers:
      - name: web
        image: tpd-test/echo:latest
        ports: [{containerPort: 8080, name: http}]
        env:
        - name: GREETING
          valueFrom: {configMapKeyRef: {name: web-config, key: greeting}}
        - name: PASSWORD
          valueFrom: {secretKeyRef: {name: web-secret, key: password}}
        - {name: MODE, value: one}
        volumeMounts:
        - {name: config, mountPath: /etc/web}
        - {name: secret, mountPath: /etc/secret}
        - {name: work, mountPath: /work}
      volumes:
      - {name: config, configMap: {name: web-config}}
      - {name: secret, secret: {secretName: web-secret}}
      - {name: work, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// NODE. The issue's kubectl list, as a developer runs it.
fn kubectl_session(sb: &Sandbox) -> Result<()> {
    let k = |args: &[&str]| sb.kubectl_ok(args);
    k(&["create", "deployment", "hello", &format!("--image={}", images::ECHO), "--port=8080"])?;
    k(&["expose", "deployment", "hello", "--port", "80", "--target-port", "8080"])?;
    let out = k(&["rollout", "status", "deployment/hello", "--timeout=60s"])?;
    ensure!(out.contains("successfully rolled out"), "rollout status: {out}");

    let wide = k(&["get", "deploy,rs,pods,svc,endpoints", "-o", "wide"])?;
    for want in [
        "deployment.apps/hello",
        "1/1",
        "pod-template-hash=",
        "Running",
        "sandbox-node",
        "service/hello",
        "10.96.",
        "80/TCP",
        ":8080",
    ] {
        ensure!(wide.contains(want), "get -o wide lacks {want:?}:\n{wide}");
    }
    let list: Value = serde_json::from_str(&k(&["get", "pods", "-l", "app=hello", "-o", "json"])?)?;
    let pod = list["items"][0]["metadata"]["name"].as_str().context("pod in -o json")?.to_owned();
    ensure!(k(&["get", "deploy", "hello", "-o", "yaml"])?.contains("availableReplicas: 1"), "-o yaml status");
    let described = k(&["describe", "pod", &pod])?;
    ensure!(
        described.contains("Status:           Running") && described.contains("Controlled By:  ReplicaSet/hello-"),
        "describe pod:\n{described}"
    );
    ensure!(k(&["logs", &pod])?.contains("http on 8080"), "logs");

    k(&["scale", "deployment/hello", "--replicas", "3"])?;
    k(&["rollout", "status", "deployment/hello", "--timeout=60s"])?;
    ensure!(k(&["get", "pods", "-l", "app=hello", "-o", "name"])?.lines().count() == 3, "three pods after scale");

    k(&["set", "env", "deployment/hello", "FOO=bar"])?;
    k(&["rollout", "status", "deployment/hello", "--timeout=90s"])?;
    let rs = k(&["get", "rs", "-l", "app=hello", "-o", "name"])?;
    ensure!(rs.lines().count() == 2, "set env made a second ReplicaSet: {rs}");
    let env_foo = k(&["exec", "deployment/hello", "--", "sh", "-c", "echo $FOO"])?;
    ensure!(env_foo.trim() == "bar", "exec sees FOO: {env_foo:?}");
    let code = sb.kubectl().args(["exec", "deployment/hello", "--", "sh", "-c", "exit 3"]).status()?;
    ensure!(code.code() == Some(3), "exec exit code: {code}");

    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), APP_YAML)?;
    let path = file.path().to_string_lossy().into_owned();
    k(&["apply", "-f", &path])?;
    k(&["rollout", "status", "deployment/web", "--timeout=90s"])?;
    std::fs::write(file.path(), APP_YAML.replace("value: one", "value: two"))?;
    let again = k(&["apply", "-f", &path])?;
    ensure!(
        again.contains("deployment.apps/web configured") && again.contains("configmap/web-config unchanged"),
        "second apply: {again}"
    );
    k(&["rollout", "status", "deployment/web", "--timeout=90s"])?;
    let seen = k(&[
        "exec",
        "deployment/web",
        "-c",
        "web",
        "--",
        "sh",
        "-c",
        "echo $GREETING $PASSWORD $MODE; cat /etc/web/greeting /work/init.txt",
    ])?;
    ensure!(seen.contains("hello s3cret two") && seen.contains("init-ran"), "env and volumes after apply: {seen}");

    let out = k(&[
        "run",
        "client",
        &format!("--image={}", images::BUSYBOX),
        "--restart=Never",
        "--",
        "wget",
        "-qO-",
        "http://hello",
    ])?;
    ensure!(out.contains("pod/client created"), "run: {out}");
    let mut logs = String::new();
    let start = Instant::now();
    while !logs.contains("hello from hello-") && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(300));
        logs =
            sb.kubectl().args(["logs", "client"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned())?;
    }
    ensure!(logs.contains("hello from hello-"), "a pod reached the Service by name: {logs:?}");

    k(&["get", "events"])?;
    k(&["delete", "-f", &path])?;
    k(&["delete", "deployment", "hello"])?;
    k(&["delete", "service", "hello"])?;
    k(&["delete", "pod", "client"])?;
    let left = k(&["get", "deploy,rs,pods", "-o", "name"])?;
    ensure!(left.trim().is_empty(), "delete left objects behind: {left}");

    // Errors a developer sees through kubectl.
    let unknown = sb.kubectl().args(["get", "--raw", "/api/v1/widgets"]).output()?;
    ensure!(
        !unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("NotFound"),
        "unknown resource"
    );
    let bad = tempfile::NamedTempFile::new()?;
    std::fs::write(bad.path(), "{not json")?;
    let malformed = sb
        .kubectl()
        .args(["create", "--raw", "/api/v1/namespaces/default/configmaps", "-f", &bad.path().to_string_lossy()])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&malformed.stderr).contains("BadRequest"),
        "malformed body: {}",
        String::from_utf8_lossy(&malformed.stderr)
    );
    // A JSON patch whose `test` op fails is 422, not 400: clients (tpd's
    // lease renewal) tell "someone changed it" from "I sent garbage" by it.
    sb.kubectl_ok(&["create", "configmap", "patched", "--from-literal", "a=1"])?;
    let failed_test = sb
        .kubectl()
        .args([
            "patch",
            "configmap",
            "patched",
            "--type",
            "json",
            "-p",
            r#"[{"op":"test","path":"/data/a","value":"2"}]"#,
        ])
        .args(["-v", "6"])
        .output()?;
    let said = String::from_utf8_lossy(&failed_test.stderr);
    ensure!(!failed_test.status.success() && said.contains("422"), "failed test op: {said}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
async fn sandbox_api_with_kube_rs_and_kubectl() -> Result<()> {
    tokio::task::spawn_blocking(images::ensure).await??;
    let sb = tokio::task::spawn_blocking(Sandbox::up).await??;
    let client = sb.client().await?;
    errors_like_the_real_api(&client).await.context("errors")?;
    patches(&client).await.context("patches")?;
    watch_from_a_resource_version(&client).await.context("watch")?;
    rollout_scale_portforward_gc(&client).await.context("rollout, scale, port-forward, gc")?;
    let sb =
        tokio::task::spawn_blocking(move || kubectl_session(&sb).map(|()| sb)).await?.context("kubectl session")?;
    // `down` removes the instance's files.
    let dir = sb.state_dir();
    drop(sb);
    ensure!(!dir.exists(), "down left {}", dir.display());
    Ok(())
}
