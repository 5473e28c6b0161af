//! What the intercept tests and benchmark share: the intercepted workload.

use crate::images;

/// Namespace `ns` with `deployment/api`: `replicas` pods of the echo server
/// (whose answers name the pod), behind two Services: `api`, port 80 to the
/// named port `http`, and `api-num`, port 8081 to the number 8080.
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
      containers:
      - name: api
        image: {echo}
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{httpGet: {{path: /, port: http}}, periodSeconds: 1}}
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
    )
}
