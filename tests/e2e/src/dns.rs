//! What the DNS tests share: a headless Service of many pods (its answer
//! does not fit 512 bytes), the wait for all of them to be ready, and a
//! small resolver in Python that shows what each transport carries.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

use crate::images;
use crate::sandbox::Sandbox;

/// Namespace `ns` with the headless Service `big` over `pods` sleeping pods.
pub fn headless_service(ns: &str, pods: usize) -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {ns}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: big, namespace: {ns}}}
spec:
  replicas: {pods}
  selector: {{matchLabels: {{app: big}}}}
  template:
    metadata: {{labels: {{app: big}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers: [{{name: sleep, image: {busybox}, command: [sleep, "3600"]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: big, namespace: {ns}}}
spec:
  clusterIP: None
  selector: {{app: big}}
  ports: [{{port: 80}}]
"#,
        busybox = images::BUSYBOX,
    )
}

/// Waits until the Service `big` of `ns` has `pods` ready addresses, and
/// returns them.
pub fn ready_addresses(sb: &Sandbox, ns: &str, pods: usize) -> Result<BTreeSet<String>> {
    let started = Instant::now();
    loop {
        let out = sb
            .kubectl_ok(&["get", "endpoints", "big", "-n", ns, "-o", "jsonpath={.subsets[*].addresses[*].ip}"])
            .unwrap_or_default();
        let ready: BTreeSet<String> = out.split_whitespace().map(str::to_owned).collect();
        if ready.len() == pods {
            eprintln!("{pods} pods ready after {:?}", started.elapsed());
            return Ok(ready);
        }
        ensure!(started.elapsed() < Duration::from_secs(300), "{} of {pods} pods ready after 300 s", ready.len());
        crate::interrupt::pause(Duration::from_millis(500))?;
    }
}

/// `python3 -c QUERY NAME [SERVER]`: one A query for NAME to SERVER (the
/// first nameserver of /etc/resolv.conf when not given) over UDP without
/// EDNS, over UDP with EDNS (4096 bytes) and over TCP (RFC 1035 4.2.2
/// framing); prints `udp`, `udp-edns` and `tcp` lines with the TC bit, the
/// answer count and the size of each reply.
pub const QUERY: &str = r#"
import socket, struct, sys
name = sys.argv[1]
server = sys.argv[2] if len(sys.argv) > 2 else next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
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

/// What [`QUERY`] printed for one transport: (truncated, answers, bytes).
pub fn reply(printed: &str, transport: &str) -> Option<(bool, usize, usize)> {
    let line = printed.lines().find(|l| l.split_whitespace().next() == Some(transport))?;
    let field = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)?.parse::<usize>().ok());
    Some((field("tc=")? == 1, field("answers=")?, field("bytes=")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_by_transport() {
        let printed =
            "udp tc=1 answers=26 bytes=506\nudp-edns tc=0 answers=40 bytes=714\ntcp tc=0 answers=40 bytes=714\n";
        assert_eq!(reply(printed, "udp"), Some((true, 26, 506)));
        assert_eq!(reply(printed, "tcp"), Some((false, 40, 714)));
        assert_eq!(reply(printed, "quic"), None);
    }
}
