//! What the intercept tests and benchmark share: the intercepted workloads
//! (HTTP and gRPC), the gRPC server, and `tpd status` as another machine
//! reads it.

use anyhow::Context as _;
use serde_json::Value;

use crate::home::Home;
use crate::images;
use crate::sandbox::Sandbox;
use crate::session;

/// The intercepts of namespace `ns` as `tpd status --output json` lists
/// them on another machine (a fresh home, no session of its own).
pub fn listed(sb: &Sandbox, ns: &str) -> anyhow::Result<Vec<Value>> {
    let out = session::tpd_in(sb, &Home::new()?)?.args(["status", "-n", ns, "--output", "json"]).output()?;
    let status: Value = serde_json::from_slice(&out.stdout).context("tpd status --output json")?;
    Ok(status["intercepts"].as_array().cloned().unwrap_or_default())
}

/// Namespace `ns` with `deployment/api`: `replicas` pods of the echo server
/// (whose answers name the pod), behind two Services: `api`, port 80 to the
/// named port `http`, and `api-num`, port 8081 to the number 8080. Each pod
/// is what apps have: an init container, and a helper container beside the
/// app (`cache`, listening on the pod's 127.0.0.1:6379). Its pods pass Pod
/// Security `restricted`.
pub fn workload(ns: &str, replicas: usize) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: api, namespace: {ns}, labels: {{app: api}}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: api}}}}
  template:
    metadata: {{labels: {{app: api}}}}
    spec:
      terminationGracePeriodSeconds: 1
      initContainers:
      - name: init
        image: {busybox}
        command: [sh, -c, "echo ready > /work/init"]
        volumeMounts: [{{name: work, mountPath: /work}}]
        securityContext: {restricted}
      containers:
      - name: api
        image: {echo}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: http}}, periodSeconds: 1}}
        volumeMounts: [{{name: work, mountPath: /work}}]
        securityContext: {restricted}
      - name: cache
        image: {busybox}
        command: [busybox, httpd, -f, -p, "127.0.0.1:6379", -h, /work]
        ports: [{{name: cache, containerPort: 6379}}]
        volumeMounts: [{{name: work, mountPath: /work}}]
        securityContext: {restricted}
      volumes: [{{name: work, emptyDir: {{}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: {ns}}}
spec:
  selector: {{app: api}}
  ports: [{{name: web, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Service
metadata: {{name: api-num, namespace: {ns}}}
spec:
  selector: {{app: api}}
  ports: [{{port: 8081, targetPort: 8080}}]
"#,
        echo = images::ECHO,
        busybox = images::BUSYBOX,
        restricted = RESTRICTED,
    )
}

/// A container security context that Pod Security's `restricted` level
/// admits, so a test can enforce it on the namespace.
const RESTRICTED: &str = "{runAsNonRoot: true, runAsUser: 1000, allowPrivilegeEscalation: false, \
    capabilities: {drop: [ALL]}, seccompProfile: {type: RuntimeDefault}}";

/// A gRPC service without generated code (raw bytes in and out): `Unary`
/// answers who it is, `Stream` answers three times; `argv[1]` is who it
/// is (the pod's host name when empty), `argv[2]` where it listens.
pub const GRPC_SERVER: &str = r#"
import grpc, socket, sys
from concurrent import futures
name = sys.argv[1] or "real"
def unary(request, context):
    return name.encode()
def stream(request, context):
    for i in range(3):
        yield name.encode()
handler = grpc.method_handlers_generic_handler("echo.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[2])
server.start()
server.wait_for_termination()
"#;

/// Namespace `ns` with `deployment/grpc`: 2 pods serving [`GRPC_SERVER`]
/// as "real" on the named port `grpc` (50051), behind Service `grpc`.
pub fn grpc_workload(ns: &str) -> String {
    let server = serde_json::to_string(GRPC_SERVER).unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: grpc, namespace: {ns}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: grpc}}}}
  template:
    metadata: {{labels: {{app: grpc}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: grpc
        image: {debian}
        command: [python3, -c, {server}, "", "0.0.0.0:50051"]
        ports: [{{name: grpc, containerPort: 50051}}]
        readinessProbe: {{tcpSocket: {{port: grpc}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: grpc, namespace: {ns}}}
spec:
  selector: {{app: grpc}}
  ports: [{{name: grpc, port: 50051, targetPort: grpc}}]
"#,
        debian = images::DEBIAN,
    )
}
