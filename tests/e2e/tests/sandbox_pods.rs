//! The sandbox's node as kubectl users see it: pods run as Docker
//! containers with their env, volumes and init containers; services answer
//! on their ClusterIPs (TCP and UDP) and DNS names, NodePorts on the host;
//! a missing image shows what a kubelet reports; `down` leaves nothing.
//!
//! One sandbox instance serves every step (the address plan allows one
//! instance per machine), so the steps run in order in one test.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;

/// Runs kubectl, asserting success; returns stdout.
fn ok(sb: &Sandbox, args: &[&str]) -> String {
    sb.kubectl_ok(args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Polls kubectl (a `get -o jsonpath` usually) until `pred` holds.
fn wait_for(sb: &Sandbox, what: &str, args: &[&str], timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match sb.kubectl_ok(args) {
            Ok(out) if pred(&out) => return out,
            Ok(out) => last = out,
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "timed out waiting for {what}; last saw {last:?} (server log: {})",
        sb.state_dir().join("serve.log").display()
    );
}

/// Docker objects of `kind` (container, network, volume) labelled for the instance.
fn labelled(sb: &Sandbox, kind: &str) -> Vec<String> {
    let label = format!("label=dev.tpd.sandbox={}", sb.name);
    let mut args = vec![kind, "ls", "-q", "--filter", &label];
    if kind == "container" {
        args.insert(2, "-a");
    }
    let out = Command::new("docker").args(&args).output().expect("docker runs");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: snode}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: snode}
stringData: {password: hunter2}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: snode}
data: {mode: fast, greeting.txt: "hi from a configmap"}
# The Service before its pods, as Kubernetes advises: service-link env vars
# (HELLO_SERVICE_PORT) only reach pods started after the Service exists.
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: snode}
spec:
  selector: {app: hello}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: udp, port: 9000, targetPort: 9000, protocol: UDP}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: snode}
spec:
  replicas: 2
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello, tier: web}}
    spec:
      securityContext: {fsGroup: 65532}
      initContainers:
      - name: prepare
        image: tpd-test/busybox:latest
        command: [sh, -c, "echo prepared-by-init > /shared/init.txt"]
        volumeMounts: [{name: shared, mountPath: /shared}]
      containers:
      - name: echo
        image: tpd-test/echo:latest
        ports: [{name: http, containerPort: 8080}, {name: echo-udp, containerPort: 9000, protocol: UDP}]
        readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
        env:
        - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
        - {name: MODE, valueFrom: {configMapKeyRef: {name: settings, key: mode}}}
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
        - {name: TIER, valueFrom: {fieldRef: {fieldPath: "metadata.labels['tier']"}}}
        - {name: COMBINED, value: "mode=$(MODE)"}
        envFrom: [{prefix: CFG_, configMapRef: {name: settings}}]
        securityContext: {runAsUser: 65532, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts:
        - {name: shared, mountPath: /shared}
        - {name: settings, mountPath: /etc/settings}
        - {name: creds, mountPath: /etc/creds}
      volumes:
      - {name: shared, emptyDir: {}}
      - {name: settings, configMap: {name: settings}}
      - {name: creds, secret: {secretName: creds, defaultMode: 0400}}
---
apiVersion: v1
kind: Service
metadata: {name: hello-np, namespace: snode}
spec:
  type: NodePort
  selector: {app: hello}
  ports: [{port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello-headless, namespace: snode}
spec: {clusterIP: None, selector: {app: hello}, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: snode}
spec: {type: ExternalName, externalName: hello.snode.svc.cluster.local}
"#;

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn pods_services_dns_and_teardown() {
    images::ensure().expect("test images build");
    let sb = Sandbox::up().expect("a sandbox instance");
    let ready = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
    wait_for(
        &sb,
        "the node to be Ready",
        &["get", "node", "sandbox-node", "-o", ready],
        Duration::from_secs(20),
        |s| s == "True",
    );

    sb.apply(APP).unwrap();
    ok(&sb, &["-n", "snode", "rollout", "status", "deployment/hello", "--timeout=90s"]);

    env_volumes_and_init(&sb);
    service_by_dns_name(&sb);
    udp_through_the_cluster_ip(&sb);
    node_port_from_the_host(&sb);
    a_new_target_port_refuses_no_connection(&sb);
    missing_image(&sb);
    logs_and_deletion(&sb);

    let out = sb.tool(&["down", "--name", &sb.name]).expect("tpd-sandbox runs");
    assert!(out.status.success(), "down failed: {}", String::from_utf8_lossy(&out.stderr));
    for kind in ["container", "network", "volume"] {
        assert_eq!(labelled(&sb, kind), Vec::<String>::new(), "{kind}s labelled for {} after down", sb.name);
    }
}

fn first_pod(sb: &Sandbox) -> String {
    ok(sb, &["-n", "snode", "get", "pods", "-l", "app=hello", "-o", "jsonpath={.items[0].metadata.name}"])
}

fn env_volumes_and_init(sb: &Sandbox) {
    let pod = first_pod(sb);
    let script = "echo PASSWORD=$PASSWORD MODE=$MODE POD_NAME=$POD_NAME POD_IP=$POD_IP TIER=$TIER COMBINED=$COMBINED CFG_mode=$CFG_mode; \
        echo HELLO_SERVICE_PORT=$HELLO_SERVICE_PORT; id -u; cat /shared/init.txt /etc/settings/greeting.txt; echo; cat /etc/creds/password; echo; \
        cat /etc/resolv.conf; cat /var/run/secrets/kubernetes.io/serviceaccount/namespace; echo; awk '$2==\"/\"{print \"rootfs-\" substr($4,1,2)}' /proc/mounts";
    let out = ok(sb, &["-n", "snode", "exec", &pod, "-c", "echo", "--", "sh", "-c", script]);
    let ip = ok(sb, &["-n", "snode", "get", "pod", &pod, "-o", "jsonpath={.status.podIP}"]);
    for want in [
        "PASSWORD=hunter2",
        "MODE=fast",
        &format!("POD_NAME={pod}"),
        &format!("POD_IP={ip}"),
        "TIER=web",
        "COMBINED=mode=fast",
        "CFG_mode=fast",
        "HELLO_SERVICE_PORT=80",
        "65532",
        "prepared-by-init",
        "hi from a configmap",
        "hunter2",
        "nameserver 10.96.0.10",
        "search snode.svc.cluster.local svc.cluster.local cluster.local",
        "options ndots:5",
        "rootfs-ro",
    ] {
        assert!(out.contains(want), "pod output lacks {want:?}:\n{out}");
    }
    assert!(ip.starts_with("10.100."), "pod IP {ip} outside the pod CIDR");
}

/// Runs a one-shot pod and returns its logs once it finished.
fn run_to_completion(sb: &Sandbox, name: &str, image: &str, cmd: &[&str]) -> String {
    let image = format!("--image={image}");
    let mut args = vec!["-n", "snode", "run", name, &image, "--restart=Never", "--"];
    args.extend_from_slice(cmd);
    ok(sb, &args);
    let phase = wait_for(
        sb,
        &format!("pod {name} to finish"),
        &["-n", "snode", "get", "pod", name, "-o", "jsonpath={.status.phase}"],
        Duration::from_secs(60),
        |p| p == "Succeeded" || p == "Failed",
    );
    let logs = ok(sb, &["-n", "snode", "logs", name]);
    assert_eq!(phase, "Succeeded", "pod {name} failed; logs:\n{logs}");
    logs
}

fn service_by_dns_name(sb: &Sandbox) {
    let logs = run_to_completion(sb, "client", images::BUSYBOX, &["wget", "-qO-", "http://hello"]);
    assert!(logs.starts_with("hello from hello-"), "wget http://hello printed {logs:?}");
    let logs = run_to_completion(sb, "lookup", images::BUSYBOX, &["nslookup", "hello.snode.svc.cluster.local"]);
    let cluster_ip = ok(sb, &["-n", "snode", "get", "svc", "hello", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(logs.contains(&cluster_ip), "nslookup printed {logs:?}, want {cluster_ip}");
    let logs = run_to_completion(
        sb,
        "short-names",
        images::BUSYBOX,
        &["sh", "-c", "wget -qO- http://hello.snode/client && wget -qO- http://hello.snode.svc/client"],
    );
    assert!(logs.contains(':'), "short names printed {logs:?}");

    // Headless: the name resolves to the ready pods' own addresses.
    let pod_ips = ok(sb, &["-n", "snode", "get", "pods", "-l", "app=hello", "-o", "jsonpath={.items[*].status.podIP}"]);
    let logs =
        run_to_completion(sb, "headless", images::BUSYBOX, &["nslookup", "hello-headless.snode.svc.cluster.local"]);
    for ip in pod_ips.split_whitespace() {
        assert!(logs.contains(ip), "headless lookup printed {logs:?}, want pod IP {ip}");
    }
    // ExternalName: a CNAME, here to another service of the cluster.
    let logs = run_to_completion(sb, "external-name", images::BUSYBOX, &["wget", "-qO-", "http://alias:80/"]);
    assert!(logs.starts_with("hello from hello-"), "wget http://alias printed {logs:?}");
}

fn udp_through_the_cluster_ip(sb: &Sandbox) {
    // busybox's nc has no UDP mode; the Debian image's python3 has.
    let script = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); \
        s.sendto(b'ping-over-udp', ('hello', 9000)); print(s.recv(4096).decode())";
    let logs = run_to_completion(sb, "udp-client", images::DEBIAN, &["python3", "-c", script]);
    assert!(
        logs.contains("client=") && logs.contains("ping-over-udp"),
        "UDP echo through the service printed {logs:?}"
    );
}

fn node_port_from_the_host(sb: &Sandbox) {
    let port: u16 = ok(sb, &["-n", "snode", "get", "svc", "hello-np", "-o", "jsonpath={.spec.ports[0].nodePort}"])
        .parse()
        .expect("a nodePort");
    let node_ip = ok(
        sb,
        &["get", "node", "sandbox-node", "-o", "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}"],
    );
    for host in [node_ip.as_str(), "127.0.0.1"] {
        let mut conn = TcpStream::connect((host, port)).unwrap_or_else(|e| panic!("NodePort {host}:{port}: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("request");
        let mut reply = String::new();
        let _ = conn.read_to_string(&mut reply);
        assert!(reply.contains("hello from hello-"), "NodePort {host}:{port} answered {reply:?}");
    }
}

/// A Service whose targetPort changes (to the same pods' port, by name and
/// by number, back and forth) keeps answering every new connection, as a
/// real cluster's: the proxy takes the change in place, it does not close
/// its listener and bind again (which refused connections meanwhile, seen
/// as a failed request when tpd points a Service at its intercept agent).
fn a_new_target_port_refuses_no_connection(sb: &Sandbox) {
    let port: u16 = ok(sb, &["-n", "snode", "get", "svc", "hello-np", "-o", "jsonpath={.spec.ports[0].nodePort}"])
        .parse()
        .expect("a nodePort");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut answered, mut refused) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(60);
            while !done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline && answered < 100_000 {
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(_) => answered += 1,
                    Err(e) => refused.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (answered, refused)
        })
    };
    for target in ["http", "8080"].repeat(5) {
        let value = if target == "http" { "\"http\"".to_owned() } else { target.to_owned() };
        let patch = format!(r#"[{{"op":"replace","path":"/spec/ports/0/targetPort","value":{value}}}]"#);
        ok(sb, &["-n", "snode", "patch", "svc", "hello-np", "--type=json", "-p", &patch]);
        std::thread::sleep(Duration::from_millis(100));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, refused) = client.join().expect("the client thread");
    assert!(answered > 0, "no connection was made");
    assert!(
        refused.is_empty(),
        "{} of {} connections refused while targetPort changed: {:?}",
        refused.len(),
        answered + refused.len() as u32,
        refused.first()
    );
}

fn missing_image(sb: &Sandbox) {
    ok(sb, &["-n", "snode", "run", "ghost", "--image=tpd-test/not-built:1"]);
    let reason = "jsonpath={.status.containerStatuses[0].state.waiting.reason}";
    wait_for(sb, "ErrImagePull", &["-n", "snode", "get", "pod", "ghost", "-o", reason], Duration::from_secs(30), |r| {
        r == "ErrImagePull" || r == "ImagePullBackOff"
    });
    wait_for(
        sb,
        "ImagePullBackOff",
        &["-n", "snode", "get", "pod", "ghost", "-o", reason],
        Duration::from_secs(30),
        |r| r == "ImagePullBackOff",
    );
    let phase = ok(sb, &["-n", "snode", "get", "pod", "ghost", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Pending");
}

fn logs_and_deletion(sb: &Sandbox) {
    let pod = first_pod(sb);
    let logs = ok(sb, &["-n", "snode", "logs", &pod, "-c", "echo"]);
    assert!(logs.contains("tpd-echo"), "logs of {pod}: {logs:?}");
    let uid = ok(sb, &["-n", "snode", "get", "pod", &pod, "-o", "jsonpath={.metadata.uid}"]);
    ok(sb, &["-n", "snode", "delete", "pod", &pod, "--wait=true", "--timeout=60s"]);
    // The node stops the containers within the grace period, then removes them.
    let label = format!("label=dev.tpd.sandbox.pod-uid={uid}");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let out = Command::new("docker").args(["ps", "-aq", "--filter", &label]).output().expect("docker");
        if out.stdout.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "containers of deleted pod {pod} remain");
        std::thread::sleep(Duration::from_millis(250));
    }
    // The ReplicaSet replaces it.
    ok(sb, &["-n", "snode", "rollout", "status", "deployment/hello", "--timeout=60s"]);
}
