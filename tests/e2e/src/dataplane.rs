//! Fixture for the data plane with real containers and no Kubernetes: a
//! "cluster" network holding an echo server and the agent (restricted as in
//! a pod), a separate "laptop" network holding the sidecar, and the
//! developer's container in the sidecar's network namespace. Both networks
//! are `--internal`; the agent is attached to both (as a pod is reachable
//! through a port-forward), the sidecar only to the laptop one, so traffic
//! to the cluster can only pass through the tunnel.
//!
//! The agent admits a transport stream only over its own loopback, where a
//! kubelet's port-forward lands, so the lab reaches its transport port
//! through a forwarder in the agent's network namespace
//! ([`loopback_forwarder`], on [`LOOPBACK_FORWARD_PORT`]); the UDP
//! transport's datagrams go to the agent's address, as they do in a cluster.
//!
//! The recipe the CLI follows is [`Lab::start_sidecar`]: the sidecar flags,
//! the DNS options the developer's container inherits, the session directory
//! bind-mounted at `/run/tpd` and readiness read from its stdout.
//!
//! Everything is labelled `tpd.test=1` and `tpd.test.dataplane=<id>` and
//! removed in `Drop`, even when a test fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Error, Result, bail};
use tpd_wire::sidecar::{Config, Endpoint, Event, PortMap, Transport};

/// The namespace the echo service pretends to live in.
pub const NAMESPACE: &str = "tpdtest";
/// The echo service's short name (a network alias) and its cluster FQDN.
pub const ECHO_NAME: &str = "echo";
/// The port the agent listens on for inbound traffic; mapped to 3000 locally.
pub const INBOUND_PORT: u16 = 8080;
pub const LOCAL_APP_PORT: u16 = 3000;
const LABEL: &str = "tpd.test.dataplane";
/// Where [`loopback_forwarder`] listens, beside the agent's ports.
pub const LOOPBACK_FORWARD_PORT: u16 = 7710;

pub fn echo_fqdn() -> String {
    format!("{ECHO_NAME}.{NAMESPACE}.svc.cluster.local")
}

/// Runs `docker args…`, returning trimmed stdout or an error with stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output().context("running docker")?;
    if !out.status.success() {
        bail!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `docker run` arguments (after the labels) of a forwarder named `name`
/// in `agent`'s network namespace: what connects to its
/// [`LOOPBACK_FORWARD_PORT`] reaches the agent's transport port on the
/// agent's loopback, as a kubelet's port-forward does. As restricted as the
/// agent, so it adds nothing a pod could not do.
pub fn loopback_forwarder(name: &str, agent: &str) -> Vec<String> {
    let to = format!("{LOOPBACK_FORWARD_PORT}=127.0.0.1:{}", tpd_wire::names::AGENT_TRANSPORT_PORT);
    let netns = format!("container:{agent}");
    let uid = tpd_wire::names::AGENT_UID.to_string();
    [
        "--name",
        name,
        "--network",
        &netns,
        "--user",
        &uid,
        "--cap-drop",
        "ALL",
        "--read-only",
        crate::images::ECHO,
        "/bin/tpd-echo",
        "--forward",
        &to,
    ]
    .map(String::from)
    .to_vec()
}

/// How the sidecar reaches the agent.
#[derive(Debug, Clone)]
pub enum Via {
    /// Framed stream over TCP, through the forwarder onto the agent's loopback.
    StreamTcp,
    /// Datagrams over UDP to the agent's address; the hello (key exchange)
    /// over TCP through the forwarder first.
    Udp,
    /// Framed stream through the Unix socket `<session dir>/agent.sock`,
    /// which the test serves (the CLI's port-forward relay does this).
    StreamUnix,
}

pub struct Lab {
    pub id: String,
    pub cluster_net: String,
    /// The developer's side: the sidecar and the agent's transport address.
    pub laptop_net: String,
    pub cluster_subnet: String,
    pub echo_ip: String,
    pub agent: String,
    pub agent_cluster_ip: String,
    pub agent_laptop_ip: String,
    pub sidecar: String,
    pub dev: String,
    pub session_dir: tempfile::TempDir,
    containers: Vec<String>,
    networks: Vec<String>,
}

impl Lab {
    /// Networks, echo server and agent; the sidecar comes with [`Lab::start_sidecar`].
    pub fn start() -> Result<Lab> {
        crate::images::ensure()?;
        for image in [crate::images::tpd_agent(), crate::images::tpd_sidecar()] {
            docker(&["image", "inspect", &image])
                .with_context(|| format!("{image} is missing: run `cargo xtask images`"))?;
        }
        let id = format!("{}-{}", std::process::id(), rand_suffix());
        let session_dir = tempfile::Builder::new().prefix("tpd-dp-session-").tempdir()?;
        let mut lab = Lab {
            cluster_net: format!("tpd-dp-cluster-{id}"),
            laptop_net: format!("tpd-dp-laptop-{id}"),
            cluster_subnet: String::new(),
            echo_ip: String::new(),
            agent: format!("tpd-dp-agent-{id}"),
            agent_cluster_ip: String::new(),
            agent_laptop_ip: String::new(),
            sidecar: format!("tpd-dp-sidecar-{id}"),
            dev: format!("tpd-dp-dev-{id}"),
            session_dir,
            containers: Vec::new(),
            networks: Vec::new(),
            id,
        };
        let laptop_net = lab.laptop_net.clone();
        for net in [lab.cluster_net.clone(), laptop_net.clone()] {
            docker(&["network", "create", "--internal", "--label", "tpd.test=1", "--label", &lab.label(), &net])?;
            lab.networks.push(net);
        }
        lab.cluster_subnet =
            docker(&["network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", &lab.cluster_net])?;

        let echo = format!("tpd-dp-echo-{}", lab.id);
        let fqdn = echo_fqdn();
        lab.run(&[
            "--name",
            &echo,
            "--network",
            &lab.cluster_net.clone(),
            "--network-alias",
            ECHO_NAME,
            "--network-alias",
            &fqdn,
            crate::images::ECHO,
        ])?;
        lab.echo_ip = ip_on(&echo, &lab.cluster_net)?;

        let ports = format!("{}={INBOUND_PORT}", tpd_wire::names::agent_env::PORTS);
        let (agent, cluster_net) = (lab.agent.clone(), lab.cluster_net.clone());
        lab.run(&[
            "--name",
            &agent,
            "--network",
            &cluster_net,
            "--user",
            "65532",
            "--cap-drop",
            "ALL",
            "--read-only",
            "-e",
            &ports,
            "-e",
            "TPD_AGENT_LOG=tpd_agent=debug,info",
            "-e",
            "APP_GREETING=hello from the cluster",
            "-e",
            "DB_PASSWORD=s3cret",
            &crate::images::tpd_agent(),
        ])?;
        let forwarder = loopback_forwarder(&format!("tpd-dp-forward-{}", lab.id), &agent);
        lab.run(&forwarder.iter().map(String::as_str).collect::<Vec<_>>())?;
        docker(&["network", "connect", &laptop_net, &agent])?;
        lab.agent_cluster_ip = ip_on(&agent, &cluster_net)?;
        lab.agent_laptop_ip = ip_on(&agent, &laptop_net)?;
        Ok(lab)
    }

    fn label(&self) -> String {
        format!("{LABEL}={}", self.id)
    }

    /// `docker run -d` with the test labels; records the container for cleanup.
    fn run(&mut self, args: &[&str]) -> Result<String> {
        let name_at = args.iter().position(|a| *a == "--name").context("containers are named")? + 1;
        self.containers.push(args[name_at].to_string());
        let label = self.label();
        let mut all = vec!["run", "-d", "--label", "tpd.test=1", "--label", &label];
        all.extend_from_slice(args);
        docker(&all)
    }

    /// The sidecar's transport (and, for UDP, hello stream) for `via`, to
    /// the agent at `agent_ip`.
    fn sidecar_config(&self, via: &Via, agent_ip: &str) -> Result<Config> {
        let forwarded: Endpoint =
            format!("stream:tcp:{agent_ip}:{LOOPBACK_FORWARD_PORT}").parse().map_err(Error::msg)?;
        Ok(match via {
            Via::StreamTcp => Config::new(Transport::Stream(forwarded)),
            Via::Udp => {
                let at = SocketAddr::new(agent_ip.parse()?, tpd_wire::names::AGENT_TRANSPORT_PORT);
                Config { hello: Some(forwarded), ..Config::new(Transport::Udp(at)) }
            }
            Via::StreamUnix => Config::new(Transport::Stream(Endpoint::Unix("/run/tpd/agent.sock".into()))),
        })
    }

    /// Where the host and the laptop network reach the agent's transport
    /// stream: the forwarder onto its loopback (for relays).
    pub fn agent_transport_addr(&self) -> String {
        format!("{}:{LOOPBACK_FORWARD_PORT}", self.agent_laptop_ip)
    }

    /// Where the Unix socket of [`Via::StreamUnix`] lives on the host.
    pub fn socket_path(&self) -> PathBuf {
        self.session_dir.path().join("agent.sock")
    }

    /// Starts the sidecar as the CLI does and waits for its ready line;
    /// then the developer's container in its namespace. Returns the ready line.
    pub fn start_sidecar(&mut self, via: &Via) -> Result<serde_json::Value> {
        let at = SidecarNet { network: self.laptop_net.clone(), agent_ip: self.agent_laptop_ip.clone() };
        self.start_sidecar_on(via, &at)
    }

    /// [`Lab::start_sidecar`] on another path to the agent (e.g. one that
    /// crosses an emulated WAN link).
    pub fn start_sidecar_on(&mut self, via: &Via, at: &SidecarNet) -> Result<serde_json::Value> {
        let sidecar = self.sidecar.clone();
        let session = format!("{}:/run/tpd", self.session_dir.path().display());
        let mut config = self.sidecar_config(via, &at.agent_ip)?;
        config.routes = vec![self.cluster_subnet.parse().map_err(Error::msg)?];
        config.ports = vec![PortMap { remote: INBOUND_PORT, local: LOCAL_APP_PORT }];
        let config = serde_json::to_string(&config)?;
        let image = crate::images::tpd_sidecar();
        let dns = dns_options();
        let mut args = vec!["--name", &sidecar, "--network", &at.network];
        // Docker refuses DNS options beside `container:`: the namespace's
        // owner has them (see [`Lab::start_netns_owner`]).
        if !at.network.starts_with("container:") {
            args.extend(dns.iter().map(String::as_str));
        }
        args.extend([
            "--cap-add",
            "NET_ADMIN",
            "--device",
            "/dev/net/tun",
            "-e",
            // Not hickory's line per DNS request: the benchmark's queries would log it.
            "TPD_SIDECAR_LOG=tpd_sidecar=debug,hickory_server=warn,info",
            "-v",
            &session,
            &image,
            "run",
            "--config",
            &config,
        ]);
        self.run(&args)?;
        let ready = self.wait_ready(Duration::from_secs(40))?;
        let dev = self.dev.clone();
        let netns = format!("container:{sidecar}");
        self.run(&["--name", &dev, "--network", &netns, crate::images::DEBIAN, "sleep", "infinity"])?;
        Ok(ready)
    }

    /// Starts a container with no network but loopback and the DNS
    /// options of a session, whose network namespace a sidecar can then
    /// share ([`SidecarNet`] `container:<name>`) once the caller has given it
    /// a path to the agent; returns its name.
    pub fn start_netns_owner(&mut self, role: &str) -> Result<String> {
        let name = format!("tpd-dp-{role}-{}", self.id);
        let mut args = vec!["--name", &name, "--network", "none"];
        let dns = dns_options();
        args.extend(dns.iter().map(String::as_str));
        args.extend([crate::images::DEBIAN, "sleep", "infinity"]);
        self.run(&args)?;
        Ok(name)
    }

    fn wait_ready(&self, limit: Duration) -> Result<serde_json::Value> {
        let start = Instant::now();
        while start.elapsed() < limit {
            let out = Command::new("docker").args(["logs", &self.sidecar]).output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            for line in stdout.lines() {
                match Event::from_line(line) {
                    Some(Event::Ready { .. }) => return Ok(serde_json::from_str(line)?),
                    Some(Event::Error { message }) => bail!("the sidecar failed: {message}"),
                    Some(Event::Warning { .. }) | None => {}
                }
            }
            let running = docker(&["inspect", "-f", "{{.State.Running}}", &self.sidecar])?;
            if running != "true" {
                bail!("the sidecar exited before ready:\n{}", self.logs(&self.sidecar));
            }
            crate::interrupt::pause(Duration::from_millis(200))?;
        }
        bail!(
            "the sidecar was not ready in {limit:?}:\n{}\nagent:\n{}",
            self.logs(&self.sidecar),
            self.logs(&self.agent)
        )
    }

    /// A container's stdout and stderr, for failure messages.
    pub fn logs(&self, container: &str) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "60", container])
            .output()
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
            .unwrap_or_default()
    }

    /// Runs `sh -c script` in the developer's container.
    pub fn dev_sh(&self, script: &str) -> Result<String> {
        docker(&["exec", &self.dev, "sh", "-c", script])
    }

    /// Starts a long-running container on the cluster network (e.g. a
    /// benchmark server or a client that bypasses the tunnel); returns its name.
    pub fn run_on_cluster(&mut self, role: &str, image: &str, cmd: &[&str]) -> Result<String> {
        let net = self.cluster_net.clone();
        self.run_on(&net, role, image, cmd)
    }

    /// Starts a long-running container on `network`, removed with the lab;
    /// returns its name.
    pub fn run_on(&mut self, network: &str, role: &str, image: &str, cmd: &[&str]) -> Result<String> {
        let net = network.to_owned();
        self.run_named(&net, role, &[], image, cmd)
    }

    /// Starts a long-running container on the cluster network that Docker's
    /// DNS also resolves by each of `aliases` (cluster names for DNS
    /// benchmarks); returns its name.
    pub fn run_on_cluster_as(&mut self, role: &str, aliases: &[String], image: &str, cmd: &[&str]) -> Result<String> {
        let net = self.cluster_net.clone();
        self.run_named(&net, role, aliases, image, cmd)
    }

    fn run_named(
        &mut self,
        network: &str,
        role: &str,
        aliases: &[String],
        image: &str,
        cmd: &[&str],
    ) -> Result<String> {
        let name = format!("tpd-dp-{role}-{}", self.id);
        let mut args = vec!["--name", name.as_str(), "--network", network];
        for alias in aliases {
            args.extend(["--network-alias", alias.as_str()]);
        }
        args.push(image);
        args.extend_from_slice(cmd);
        self.run(&args)?;
        Ok(name)
    }

    /// Resident memory of a container's main process, in KiB.
    pub fn rss_kib(container: &str) -> Result<u64> {
        let pid = docker(&["inspect", "-f", "{{.State.Pid}}", container])?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS in /proc/<pid>/status")
    }

    /// Runs `sh -c script` in a throwaway Debian container (curl, python3) on the cluster network.
    pub fn cluster_sh(&self, script: &str) -> Result<String> {
        let label = self.label();
        docker(&[
            "run",
            "--rm",
            "--label",
            "tpd.test=1",
            "--label",
            &label,
            "--network",
            &self.cluster_net,
            crate::images::DEBIAN,
            "sh",
            "-c",
            script,
        ])
    }

    pub fn status_file(&self) -> PathBuf {
        self.session_dir.path().join(tpd_wire::names::STATUS_FILE)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::env::var_os("TPD_KEEP").is_some() {
            eprintln!("TPD_KEEP set: leaving containers {:?} and networks {:?}", self.containers, self.networks);
            return;
        }
        for c in self.containers.iter().rev() {
            let _ = Command::new("docker").args(["rm", "-f", "-v", c]).output();
        }
        // Throwaway containers of cluster_sh, should one have been left.
        let filter = format!("label={}", self.label());
        if let Ok(ids) = docker(&["ps", "-aq", "--filter", &filter]) {
            for id in ids.lines() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        for n in &self.networks {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
    }
}

/// Where a sidecar runs and the address it reaches the agent at.
#[derive(Debug, Clone)]
pub struct SidecarNet {
    /// Its `docker run --network`: the lab's laptop network, or
    /// `container:<name>` of a container from [`Lab::start_netns_owner`].
    pub network: String,
    /// The agent's address for the transport (UDP) and the forwarder (TCP).
    pub agent_ip: String,
}

/// The DNS options a session gives the developer's container: the sidecar's
/// resolver and the pod's search path.
fn dns_options() -> Vec<String> {
    let search = format!("{NAMESPACE}.svc.cluster.local");
    [
        "--dns",
        "127.0.0.1",
        "--dns-search",
        &search,
        "--dns-search",
        "svc.cluster.local",
        "--dns-search",
        "cluster.local",
        "--dns-option",
        "ndots:5",
    ]
    .map(String::from)
    .to_vec()
}

/// The address of `container` on `network`.
pub fn ip_on(container: &str, network: &str) -> Result<String> {
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let ip = docker(&["inspect", "-f", &fmt, container])?;
    if ip.is_empty() {
        bail!("{container} has no address on {network}");
    }
    Ok(ip)
}

fn rand_suffix() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{:06x}", nanos & 0xff_ffff)
}

/// The sha256 of what tpd-echo's `GET /bytes/n` sends.
pub fn echo_bytes_sha256(n: u64) -> String {
    use sha2::{Digest, Sha256};
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut h = Sha256::new();
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        h.update(&chunk[..take]);
        left -= take as u64;
    }
    format!("{:x}", h.finalize())
}

/// A relay the test controls between the sidecar's Unix socket and the
/// agent's TCP transport port, standing in for the CLI's port-forward relay;
/// [`Relay::cut`] drops every open connection as a broken port-forward would.
/// It runs on its own thread, so tests stay plain blocking code.
pub struct Relay {
    cut: tokio::sync::watch::Sender<u64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    pub fn start(socket: &Path, agent: String) -> Result<Relay> {
        let listener =
            std::os::unix::net::UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        listener.set_nonblocking(true)?;
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
                    return;
                };
                let serve = async {
                    while let Ok((client, _)) = listener.accept().await {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::spawn(relay_one(client, agent.clone(), cut_rx.clone()));
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            })
        });
        Ok(Relay { cut, stop: Some(stop), accepted })
    }

    /// Closes every connection open now; new ones are relayed again.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn relay_one(mut client: tokio::net::UnixStream, agent: String, mut cut: tokio::sync::watch::Receiver<u64>) {
    cut.mark_unchanged();
    let Ok(mut upstream) = tokio::net::TcpStream::connect(&agent).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = cut.changed() => {}
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
