//! The data plane with real containers (see `tpd_e2e::dataplane`): what a
//! developer would check from inside their container, and what a client in
//! the cluster sees, over both transports.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tpd_e2e::dataplane::{ECHO_NAME, INBOUND_PORT, LOCAL_APP_PORT, Lab, Relay, Via, echo_bytes_sha256, echo_fqdn};

const MIB: u64 = 1024 * 1024;

/// The two transport tests each push 100 MiB both ways and 500 concurrent
/// connections through two cores; run side by side they measure the
/// machine's overload, not the tunnel. One at a time.
static LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_load_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    LOAD.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Stream transport through a relay the test cuts mid-transfer (as a broken port-forward).
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn stream_transport_carries_everything_and_survives_a_cut() -> Result<()> {
    let _turn = one_load_test_at_a_time();
    let mut lab = Lab::start()?;
    let relay = Relay::start(&lab.socket_path(), lab.agent_transport_addr())?;
    let ready = lab.start_sidecar(&Via::StreamUnix)?;
    let run = || -> Result<()> {
        check_what_a_developer_sees(&lab, &ready)?;
        check_tunnel_mtu(&lab, tpd_wire::names::STREAM_TUNNEL_MTU)?;
        check_concurrent(&lab, 500)?;
        check_transfer_survives_cut(&lab, &relay)
    };
    run().with_context(|| format!("sidecar:\n{}\nagent:\n{}", lab.logs(&lab.sidecar), lab.logs(&lab.agent)))
}

/// WireGuard over plain UDP (keys exchanged over the stream first).
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn udp_transport_carries_everything() -> Result<()> {
    let _turn = one_load_test_at_a_time();
    let mut lab = Lab::start()?;
    let ready = lab.start_sidecar(&Via::Udp)?;
    check_what_a_developer_sees(&lab, &ready)
        .and_then(|()| check_tunnel_mtu(&lab, tpd_wire::names::TUNNEL_MTU))
        .with_context(|| format!("sidecar:\n{}\nagent:\n{}", lab.logs(&lab.sidecar), lab.logs(&lab.agent)))
}

/// A burst of 500 connections opened at once over the UDP transport.
/// Datagrams are lost in such a burst (the UDP sockets keep default
/// buffers); every connection must still be answered, which takes the
/// agent's TCP retransmitting on its own timer, not only when the peer
/// sends again.
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn udp_transport_answers_a_burst_of_500_connections() -> Result<()> {
    let _turn = one_load_test_at_a_time();
    let mut lab = Lab::start()?;
    lab.start_sidecar(&Via::Udp)?;
    check_concurrent(&lab, 500)
        .with_context(|| format!("sidecar:\n{}\nagent:\n{}", lab.logs(&lab.sidecar), lab.logs(&lab.agent)))
}

/// The checks both transports must pass, in the order a developer meets them.
fn check_what_a_developer_sees(lab: &Lab, ready: &serde_json::Value) -> Result<()> {
    check_ready(lab, ready)?;
    check_tcp_by_ip_and_client_address(lab)?;
    check_dns(lab)?;
    check_udp(lab)?;
    check_refused_and_unreachable(lab)?;
    check_inbound(lab)?;
    check_bulk_both_ways(lab, 100 * MIB)
}

/// Readiness: the stdout line without secrets, the 0600 status file with the agent's env minus tpd's.
fn check_ready(lab: &Lab, ready: &serde_json::Value) -> Result<()> {
    ensure!(ready["agent_version"] == tpd_wire::VERSION, "ready line: {ready}");
    ensure!(!ready.to_string().contains("s3cret"), "the ready line must not carry the env: {ready}");
    let path = lab.status_file();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path)?.permissions());
    ensure!(mode & 0o777 == 0o600, "status.json mode {mode:o}");
    let status: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    ensure!(status["env"]["DB_PASSWORD"] == "s3cret", "env injected: {}", status["env"]);
    ensure!(status["env"]["APP_GREETING"] == "hello from the cluster");
    ensure!(status["env"].get(tpd_wire::names::agent_env::PORTS).is_none(), "tpd's own variables are stripped");
    let sidecar_logs = lab.logs(&lab.sidecar);
    ensure!(!sidecar_logs.contains("s3cret"), "secrets never in logs");
    Ok(())
}

/// Datagrams over UDP must fit a 1500-byte path; frames on a stream carry
/// 64 KiB packets, so bulk transfers cost far fewer packets.
fn check_tunnel_mtu(lab: &Lab, want: u16) -> Result<()> {
    let mtu = lab.dev_sh("cat /sys/class/net/tpd0/mtu")?;
    ensure!(mtu.trim() == want.to_string(), "tunnel MTU {} in the developer's container, want {want}", mtu.trim());
    Ok(())
}

fn check_tcp_by_ip_and_client_address(lab: &Lab) -> Result<()> {
    let hello = lab.dev_sh(&format!("curl -sS --max-time 10 http://{}:8080/", lab.echo_ip))?;
    ensure!(hello.starts_with("hello from"), "echo by IP: {hello}");
    let client = lab.dev_sh(&format!("curl -sS --max-time 10 http://{}:8080/client", lab.echo_ip))?;
    ensure!(
        client.starts_with(&format!("{}:", lab.agent_cluster_ip)),
        "the echo server must see the agent's address {}, saw {client}",
        lab.agent_cluster_ip
    );
    Ok(())
}

fn check_dns(lab: &Lab) -> Result<()> {
    for name in [ECHO_NAME.to_string(), format!("{ECHO_NAME}.{}", tpd_e2e::dataplane::NAMESPACE), echo_fqdn()] {
        let client = lab.dev_sh(&format!("curl -sS --max-time 10 http://{name}:8080/client"))?;
        ensure!(client.starts_with(&format!("{}:", lab.agent_cluster_ip)), "echo by name {name}: {client}");
    }
    // getaddrinfo asks A and AAAA: the AAAA of a cluster name must not stall it.
    let took = lab.dev_sh(&format!(
        "python3 -c \"import socket,time; t=time.time(); a=socket.getaddrinfo('{ECHO_NAME}', 8080); print(time.time()-t, a[0][4][0])\""
    ))?;
    let (secs, ip) = took.split_once(' ').context("python output")?;
    ensure!(ip == lab.echo_ip, "resolved {ip}, echo is {}", lab.echo_ip);
    ensure!(secs.parse::<f64>()? < 1.0, "A+AAAA lookup of a cluster name took {secs}s");
    Ok(())
}

fn check_udp(lab: &Lab) -> Result<()> {
    let out = lab.dev_sh(&format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); \
         s.sendto(b'ping-udp', ('{}', 9000)); print(s.recv(2048).decode())\"",
        lab.echo_ip
    ))?;
    ensure!(out.starts_with(&format!("client={}:", lab.agent_cluster_ip)), "udp echo: {out}");
    ensure!(out.ends_with("ping-udp"), "udp echo payload: {out}");
    // A small question with a large answer (DNS over EDNS0 gives up to 4 KiB):
    // the answer is larger than the tunnel's MTU, and over the UDP transport
    // its datagram larger than the path's; it must arrive whole.
    let big = lab.dev_sh(&format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); \
         s.sendto(b'bytes:4000', ('{}', 9000)); print(s.recv(8192).count(b'x'))\"",
        lab.echo_ip
    ))?;
    ensure!(big == "4000", "a 4,000-byte UDP answer arrived with {big} bytes of it");
    // A datagram larger than the tunnel's MTU: the developer's kernel sends
    // it in fragments, and the agent must put it together before relaying.
    let mtu: usize = lab.dev_sh("cat /sys/class/net/tpd0/mtu")?.trim().parse()?;
    let size = (mtu + 1000).min(65_000);
    let echoed = lab.dev_sh(&format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); \
         s.sendto(b'y' * {size}, ('{}', 9000)); print(s.recv(70000).count(b'y'))\"",
        lab.echo_ip
    ))?;
    ensure!(
        echoed == size.to_string(),
        "a {size}-byte datagram (tunnel MTU {mtu}) came back with {echoed} bytes of it"
    );
    Ok(())
}

fn check_refused_and_unreachable(lab: &Lab) -> Result<()> {
    let probe = |addr: &str| {
        lab.dev_sh(&format!(
            "python3 -c \"import socket,time; t=time.time()\ntry:\n  socket.create_connection(('{addr}', 1), timeout=30); print('connected', 0)\n\
             except OSError as e:\n  print(type(e).__name__, time.time()-t)\""
        ))
    };
    let refused = probe(&lab.echo_ip)?;
    let (kind, secs) = refused.split_once(' ').context("probe output")?;
    ensure!(kind == "ConnectionRefusedError", "closed port: {refused}");
    ensure!(secs.parse::<f64>()? < 2.0, "refusal took {secs}s");

    // An unused address of the cluster network: fails, bounded, does not hang.
    let unused = unused_address(&lab.cluster_subnet)?;
    let out = probe(&unused)?;
    let (kind, secs) = out.split_once(' ').context("probe output")?;
    ensure!(kind != "connected" && kind != "TimeoutError", "unreachable address: {out}");
    ensure!(secs.parse::<f64>()? < 15.0, "unreachable took {secs}s");
    Ok(())
}

/// The .250 address of a Docker subnet, which Docker hands out last.
fn unused_address(subnet: &str) -> Result<String> {
    let net = subnet.split('/').next().context("subnet")?;
    let mut octets: Vec<&str> = net.split('.').collect();
    ensure!(octets.len() == 4, "IPv4 subnet expected: {subnet}");
    octets[3] = "250";
    Ok(octets.join("."))
}

fn check_inbound(lab: &Lab) -> Result<()> {
    lab.dev_sh("mkdir -p /tmp/www && echo inbound-ok > /tmp/www/hello.txt")?;
    // An app that listens on loopback only.
    let listen = format!("127.0.0.1:{LOCAL_APP_PORT}");
    tpd_e2e::dataplane::docker(&["exec", "-d", &lab.dev, "busybox", "httpd", "-f", "-p", &listen, "-h", "/tmp/www"])?;
    let url = format!("http://{}:{INBOUND_PORT}/hello.txt", lab.agent_cluster_ip);
    // The app may take a moment to listen; bounded retries.
    let got = lab.cluster_sh(&format!(
        "for i in 1 2 3 4 5 6 7 8 9 10; do curl -sS --max-time 5 {url} && exit 0; sleep 1; done; exit 1"
    ))?;
    ensure!(got == "inbound-ok", "inbound to 127.0.0.1:{LOCAL_APP_PORT} in the developer's container: {got:?}");
    Ok(())
}

fn check_bulk_both_ways(lab: &Lab, bytes: u64) -> Result<()> {
    let start = Instant::now();
    let down = lab.dev_sh(&format!("curl -sS --max-time 120 http://{}:8080/bytes/{bytes} | sha256sum", lab.echo_ip))?;
    let down_secs = start.elapsed().as_secs_f64();
    ensure!(down.starts_with(&echo_bytes_sha256(bytes)), "download sha256: {down}");

    let sent = lab.dev_sh(&format!("head -c {bytes} /dev/urandom > /tmp/up.bin && sha256sum /tmp/up.bin"))?;
    let sent = sent.split_whitespace().next().context("sha256sum output")?.to_string();
    let start = Instant::now();
    let echoed = lab.dev_sh(&format!(
        "curl -sS --max-time 120 -H 'Expect:' --data-binary @/tmp/up.bin http://{}:8080/sha256",
        lab.echo_ip
    ))?;
    let up_secs = start.elapsed().as_secs_f64();
    ensure!(echoed == sent, "upload sha256: sent {sent}, server saw {echoed}");
    let mib = bytes as f64 / MIB as f64;
    eprintln!("bulk: {mib} MiB down in {down_secs:.1}s, up in {up_secs:.1}s");
    Ok(())
}

fn check_concurrent(lab: &Lab, n: usize) -> Result<()> {
    // Threads (python3-minimal has no asyncio); the barrier holds every
    // connection open at once before any of them talks.
    let script = format!(
        r#"
import socket, threading
n = {n}
barrier = threading.Barrier(n, timeout=60)
ok = []
def one(i):
    try:
        s = socket.create_connection(('{ip}', 9000), timeout=60)
        barrier.wait()
        msg = ('conn-%d' % i).encode()
        s.sendall(msg)
        got = b''
        while len(got) < len(msg):
            b = s.recv(64)
            if not b: break
            got += b
        s.close()
        if got == msg: ok.append(i)
    except Exception:
        barrier.abort()
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]
[t.join(90) for t in ts]
print(len(ok))
"#,
        ip = lab.echo_ip
    );
    let ok = lab.dev_sh(&format!("python3 -c \"{}\"", script.replace('"', "\\\"")))?;
    ensure!(ok == n.to_string(), "{ok} of {n} concurrent connections answered");
    Ok(())
}

fn check_transfer_survives_cut(lab: &Lab, relay: &Relay) -> Result<()> {
    let bytes = 24 * MIB;
    let before = relay.accepted.load(std::sync::atomic::Ordering::SeqCst);
    let dev = lab.dev.clone();
    let url = format!("http://{}:8080/bytes/{bytes}", lab.echo_ip);
    // ~8 s at 3 MiB/s: long enough to cut the transport in the middle.
    let download = std::thread::spawn(move || {
        tpd_e2e::dataplane::docker(&[
            "exec",
            &dev,
            "sh",
            "-c",
            &format!("curl -sS --max-time 90 --limit-rate 3M {url} | sha256sum"),
        ])
    });
    std::thread::sleep(Duration::from_secs(3));
    relay.cut();
    let got = download.join().map_err(|_| anyhow::anyhow!("download thread panicked"))??;
    ensure!(got.starts_with(&echo_bytes_sha256(bytes)), "transfer across a transport cut: {got}");
    let after = relay.accepted.load(std::sync::atomic::Ordering::SeqCst);
    ensure!(after > before, "the sidecar must have redialled the stream ({before} -> {after} connections)");
    // The session is the same: new connections work too.
    check_tcp_by_ip_and_client_address(lab)
}

/// An agent of another protocol version: the sidecar stops with an error
/// event naming both versions instead of reading garbage.
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn version_mismatch_fails_with_both_versions() -> Result<()> {
    use std::io::{Read, Write};
    let mut lab = Lab::start()?;
    let listener = std::os::unix::net::UnixListener::bind(lab.socket_path())?;
    let theirs = tpd_wire::names::PROTOCOL_VERSION + 1;
    // Detached: it ends when the sidecar's connection closes.
    std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        let mut hello = tpd_wire::hello::Hello { role: tpd_wire::hello::Role::Agent, public_key: [7; 32] }.encode();
        hello[4..6].copy_from_slice(&theirs.to_be_bytes());
        conn.write_all(&hello)?;
        let mut sink = [0u8; 64];
        while conn.read(&mut sink)? > 0 {}
        Ok(())
    });
    let err = lab.start_sidecar(&Via::StreamUnix).expect_err("a mismatched agent must not become ready");
    let msg = format!("{err:#}");
    ensure!(msg.contains("version mismatch"), "{msg}");
    ensure!(msg.contains(&format!("speaks tpd protocol {}", tpd_wire::names::PROTOCOL_VERSION)), "{msg}");
    ensure!(msg.contains(&format!("peer speaks {theirs}")), "{msg}");
    Ok(())
}
