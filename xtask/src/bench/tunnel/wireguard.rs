//! The userspace WireGuard baselines of `cargo xtask bench tunnel`:
//! boringtun-cli and wireguard-go, each run two ways.
//!
//! - [`NetnsPair`]: two network namespaces joined by a veth, the server in
//!   the far one on its tunnel address. The tunnel is the whole path.
//! - [`Gateway`]: the way Gefyra and a plain VPN reach a cluster. A client
//!   container on the lab's laptop network tunnels to a gateway container
//!   on both networks, whose kernel forwards and masquerades to the server
//!   on the cluster network. Same networks, client image and server as
//!   tpd, so its round trip differs from tpd's only by what carries it
//!   from the laptop network to the cluster: a kernel-routing gateway
//!   here, tpd's agent with its own sockets there.
//!
//! The daemons are the host's binaries, run in the containers' network
//! namespaces with `nsenter`, so the test images need no WireGuard tools.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tpd_e2e::dataplane::{Lab, docker, ip_on};

use super::{PORT, PROBE, Runner, in_container};
use crate::bench::cpu::Processes;

/// Plain TCP between the two namespaces of a userspace WireGuard baseline.
pub const NETNS_VETH: &str = "TCP over netns veth (no tunnel)";
/// The server's veth address in the far namespace (its tunnel address is 10.77.1.2).
pub const VETH_SERVER_IP: &str = "10.77.0.2";

/// A userspace WireGuard implementation the harness runs as a baseline.
#[derive(Debug, Clone, Copy)]
pub enum Userspace {
    /// boringtun-cli, the same WireGuard library tpd uses, behind a kernel TUN.
    Boringtun,
    /// wireguard-go, the reference userspace implementation.
    WireguardGo,
}

impl Userspace {
    pub fn name(self) -> &'static str {
        match self {
            Userspace::Boringtun => "boringtun-cli",
            Userspace::WireguardGo => "wireguard-go",
        }
    }

    /// Short, for interface names (at most 15 bytes in all).
    fn tag(self) -> &'static str {
        match self {
            Userspace::Boringtun => "bt",
            Userspace::WireguardGo => "go",
        }
    }

    /// The baseline's name when the server sits at the tunnel's far end.
    pub fn between_netns(self) -> &'static str {
        match self {
            Userspace::Boringtun => "boringtun-cli between netns",
            Userspace::WireguardGo => "wireguard-go between netns",
        }
    }

    /// The baseline's name when it is a gateway into the cluster network.
    pub fn as_gateway(self) -> &'static str {
        match self {
            Userspace::Boringtun => "boringtun-cli as a cluster gateway",
            Userspace::WireguardGo => "wireguard-go as a cluster gateway",
        }
    }

    /// The command that creates interface `iface` and serves its UAPI
    /// socket in the foreground, installing the program when missing.
    fn command(self, iface: &str) -> Result<String> {
        match self {
            Userspace::WireguardGo => {
                if sh("command -v wireguard-go").is_err() {
                    eprintln!("installing wireguard-go for the baseline…");
                    sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wireguard-go")?;
                }
                Ok(format!("env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f {iface}"))
            }
            Userspace::Boringtun => {
                let bin = boringtun_cli()?;
                Ok(format!("{} --foreground --disable-drop-privileges {iface}", bin.display()))
            }
        }
    }
}

/// boringtun-cli from PATH, or built once with `cargo install` into the
/// user's cache (Debian does not package it).
fn boringtun_cli() -> Result<std::path::PathBuf> {
    if let Ok(path) = sh("command -v boringtun-cli") {
        return Ok(path.into());
    }
    let root = tpd_e2e::sandbox::cache_dir().join("tpd-bench");
    let bin = root.join("bin/boringtun-cli");
    if !bin.exists() {
        eprintln!("building boringtun-cli for the baseline (cargo install, once)…");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--quiet", "--locked", "boringtun-cli", "--root"])
            .arg(&root)
            .status()?;
        if !status.success() {
            bail!("cargo install boringtun-cli failed ({status})");
        }
    }
    Ok(bin)
}

fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh").args(["-c", cmd]).output()?;
    if !out.status.success() {
        bail!("{cmd}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A network namespace commands run in: the prefix that enters it, `ip
/// netns exec NAME` for one of ours or `nsenter -t PID -n` for a container's.
struct Netns(String);

impl Netns {
    fn sh(&self, cmd: &str) -> Result<String> {
        sh(&format!("{} {cmd}", self.0))
    }
}

/// A fresh WireGuard key pair (private, public), from `wg` (installed
/// when missing: every baseline configures its ends with it).
fn keypair() -> Result<(String, String)> {
    if sh("command -v wg").is_err() {
        eprintln!("installing wireguard-tools for the baselines…");
        sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wireguard-tools")?;
    }
    let private = sh("wg genkey")?;
    let public = sh(&format!("echo {private} | wg pubkey"))?;
    Ok((private, public))
}

/// One end of a baseline tunnel, running in `ns`: its own key, the
/// peer's, and what it routes to the peer.
struct End<'a> {
    which: Userspace,
    ns: &'a Netns,
    iface: String,
    /// Its tunnel address, with prefix.
    addr: String,
    private: String,
    peer: String,
    /// The peer's underlay address (it listens on 51820 too).
    endpoint: String,
    allowed_ips: String,
}

impl End<'_> {
    /// Starts the daemon, waits for its interface and configures it. The
    /// daemon is returned so its owner can stop it: it would otherwise
    /// keep a container's namespace, and itself, alive.
    fn up(&self) -> Result<Child> {
        let start = format!("exec {} {}", self.ns.0, self.which.command(&self.iface)?);
        let daemon = Command::new("sh").args(["-c", &start]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        match self.configure() {
            Ok(()) => Ok(daemon),
            Err(e) => {
                stop(&mut vec![(daemon, self.iface.clone())]);
                Err(e)
            }
        }
    }

    fn configure(&self) -> Result<()> {
        let socket = format!("/var/run/wireguard/{}.sock", self.iface);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(&socket).exists() {
            if Instant::now() > deadline {
                bail!("{} did not create {socket} within 10 s", self.which.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let key_file = format!("/tmp/tpdbench-{}.key", self.iface);
        // Readable by root alone; one a crashed run left is replaced.
        let _ = std::fs::remove_file(&key_file);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)?
            .write_all(self.private.as_bytes())?;
        let set = self.ns.sh(&format!(
            "wg set {iface} private-key {key_file} listen-port 51820 peer {peer} allowed-ips {allowed} endpoint {endpoint}:51820 && \
             {ns} ip addr add {addr} dev {iface} && {ns} ip link set {iface} mtu 1420 up",
            iface = self.iface,
            peer = self.peer,
            allowed = self.allowed_ips,
            endpoint = self.endpoint,
            addr = self.addr,
            ns = self.ns.0,
        ));
        // The private key file goes whether or not the setup worked.
        let _ = std::fs::remove_file(&key_file);
        set.map(drop)
    }
}

/// The two tunnel daemons (and whatever they started).
fn ends(daemons: &[(Child, String)]) -> Processes {
    Processes::new(daemons.iter().map(|(daemon, _)| daemon.id()))
}

/// Stops baseline daemons and removes their UAPI sockets (a daemon killed
/// with SIGKILL would leave them).
fn stop(daemons: &mut Vec<(Child, String)>) {
    for (mut daemon, iface) in daemons.drain(..) {
        let _ = daemon.kill();
        let _ = daemon.wait();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{iface}.sock"));
    }
}

/// Two network namespaces joined by a veth pair, with a userspace
/// WireGuard tunnel between them and the probe server on the far side.
pub struct NetnsPair {
    ns: [String; 2],
    pub server_ip: String,
    daemons: Vec<(Child, String)>,
    server: Option<Child>,
}

impl NetnsPair {
    pub fn start(which: Userspace) -> Result<NetnsPair> {
        // Names carry the implementation: each leaves a UAPI socket named
        // after its interface, and the two run one after the other.
        let id = format!("{}{}", which.tag(), std::process::id());
        let ns = [format!("tpdbench-a-{id}"), format!("tpdbench-b-{id}")];
        let mut this = NetnsPair { ns: ns.clone(), server_ip: "10.77.1.2".into(), daemons: Vec::new(), server: None };
        let keys = [keypair()?, keypair()?];
        for n in &ns {
            sh(&format!("ip netns add {n}"))?;
        }
        sh(&format!("ip link add tpdb-a{id} netns {} type veth peer name tpdb-b{id} netns {}", ns[0], ns[1]))?;
        for (i, n) in ns.iter().enumerate() {
            let (side, other) = (if i == 0 { 'a' } else { 'b' }, 1 - i);
            let netns = Netns(format!("ip netns exec {n}"));
            sh(&format!(
                "ip -n {n} link set lo up && ip -n {n} addr add 10.77.0.{a}/24 dev tpdb-{side}{id} && ip -n {n} link set tpdb-{side}{id} up",
                a = i + 1
            ))?;
            let end = End {
                which,
                ns: &netns,
                iface: format!("tpdwg{side}{id}"),
                addr: format!("10.77.1.{}/24", i + 1),
                private: keys[i].0.clone(),
                peer: keys[other].1.clone(),
                endpoint: format!("10.77.0.{}", other + 1),
                allowed_ips: format!("10.77.1.{}/32", other + 1),
            };
            this.daemons.push((end.up()?, end.iface));
        }
        this.server = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns[1], "python3", "-c", PROBE, "serve", &PORT.to_string()])
                .stdout(Stdio::null())
                .spawn()?,
        );
        std::thread::sleep(Duration::from_millis(500));
        Ok(this)
    }

    /// Both ends of the tunnel.
    pub fn ends(&self) -> Processes {
        ends(&self.daemons)
    }

    pub fn runner(&self) -> Box<Runner> {
        let ns = self.ns[0].clone();
        Box::new(move |args: &[String]| {
            // `--foreground` keeps the probe in our process group, so
            // Ctrl-C ends it with us instead of leaving it to its timeout.
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "timeout", "--foreground", "120", "python3", "-c", PROBE])
                .args(args)
                .output()?;
            if !out.status.success() {
                bail!("probe in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        stop(&mut self.daemons);
        for n in &self.ns {
            // Deleting the namespace deletes the veth pair with it.
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// The tunnel's addresses on the gateway baseline (client, gateway).
const GATEWAY_TUNNEL: [&str; 2] = ["10.78.1.1", "10.78.1.2"];

/// A userspace WireGuard gateway from the lab's laptop network into its
/// cluster network; see the module's doc. Its containers go with the lab;
/// its daemons go with this value, which must be dropped first.
pub struct Gateway {
    pub client: String,
    daemons: Vec<(Child, String)>,
}

impl Gateway {
    /// The gateway on the lab's laptop network beside the client, as in
    /// `bench tunnel`.
    pub fn start(which: Userspace, lab: &mut Lab) -> Result<Gateway> {
        Gateway::start_over(which, lab, |lab, client, gateway| {
            docker(&["network", "connect", &lab.laptop_net, gateway])?;
            Ok([ip_on(client, &lab.laptop_net)?, ip_on(gateway, &lab.laptop_net)?])
        })
    }

    /// The gateway with the path between the two ends that `underlay` gives
    /// the client container and the gateway container (on the laptop and
    /// the cluster network), returning their addresses on it.
    pub fn start_over(
        which: Userspace,
        lab: &mut Lab,
        underlay: impl FnOnce(&mut Lab, &str, &str) -> Result<[String; 2]>,
    ) -> Result<Gateway> {
        let sleeper = ["sleep", "infinity"];
        let image = tpd_e2e::images::DEBIAN;
        let laptop_net = lab.laptop_net.clone();
        let client = lab.run_on(&laptop_net, &format!("{}-client", which.tag()), image, &sleeper)?;
        let gateway = lab.run_on_cluster(&format!("{}-gateway", which.tag()), image, &sleeper)?;
        let enter = |container: &str| -> Result<Netns> {
            let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container])?;
            Ok(Netns(format!("nsenter -t {pid} -n")))
        };
        let ns = [enter(&client)?, enter(&gateway)?];
        let underlay = underlay(lab, &client, &gateway)?;
        let routed = [format!("{}/32,{}", GATEWAY_TUNNEL[1], lab.cluster_subnet), format!("{}/32", GATEWAY_TUNNEL[0])];
        let keys = [keypair()?, keypair()?];
        let mut this = Gateway { client, daemons: Vec::new() };
        let id = format!("{}{}", which.tag(), std::process::id());
        for (i, side) in ['c', 'g'].into_iter().enumerate() {
            let other = 1 - i;
            let end = End {
                which,
                ns: &ns[i],
                iface: format!("tpdgw{side}{id}"),
                addr: format!("{}/24", GATEWAY_TUNNEL[i]),
                private: keys[i].0.clone(),
                peer: keys[other].1.clone(),
                endpoint: underlay[other].clone(),
                allowed_ips: routed[i].clone(),
            };
            this.daemons.push((end.up()?, end.iface));
        }
        let client_iface = &this.daemons[0].1;
        ns[0].sh(&format!("ip route add {} dev {client_iface}", lab.cluster_subnet))?;
        // What a gateway pod does: forward, and masquerade the tunnel's
        // addresses so the server answers the gateway.
        ns[1].sh("sysctl -qw net.ipv4.ip_forward=1")?;
        ns[1]
            .sh(&format!("iptables -t nat -A POSTROUTING -s {}/24 -j MASQUERADE", GATEWAY_TUNNEL[0]))
            .context("iptables (masquerade on the gateway)")?;
        Ok(this)
    }

    pub fn runner(&self) -> Box<Runner> {
        in_container(self.client.clone())
    }

    /// Both ends of the tunnel: the client's daemon and the gateway's.
    pub fn ends(&self) -> Processes {
        ends(&self.daemons)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        stop(&mut self.daemons);
    }
}
