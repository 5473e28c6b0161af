//! Fixtures for the volume bridge: the agent's file service and the
//! sidecar's FUSE client (`tpd-volumes`), run as they ship either in this
//! process over loopback or inside containers, plus the CLI's mount plan.
//!
//! In containers, the test binary itself is the program: it is bind-mounted
//! into `tpd-test/debian` and started with [`ROLE_ENV`] naming the part to
//! play (see [`run_role`]). The agent container is as restricted as in a
//! pod; the sidecar container has SYS_ADMIN and /dev/fuse and its volume
//! directory bind-mounted rshared; the developer's container gets exactly the
//! mounts the CLI plans (`tpd::mounts::plan`). There a private Docker
//! network stands in for the tunnel; [`TunnelMount`] runs the real images
//! with the WireGuard tunnel between them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tpd::mounts;
use tpd_volumes::fuse;
use tpd_volumes::server as agent_files;
use tpd_wire::files::VolumeMount;

/// Env var naming the part the test binary plays inside a container.
pub const ROLE_ENV: &str = "TPD_VOLUMES_ROLE";
/// Env var with the agent's file-service address, for the sidecar role.
pub const SERVER_ENV: &str = "TPD_VOLUMES_SERVER";
/// Env var with the directory the loopback role mounts under.
pub const LOCAL_ENV: &str = "TPD_VOLUMES_LOCAL";
/// What the sidecar and loopback roles print once every volume is mounted.
pub const MOUNTED: &str = "tpd-volumes: mounted";

/// Serves the mounts in `names::agent_env::MOUNTS` on `listen` until killed.
pub async fn serve(listen: SocketAddr, table: Arc<agent_files::MountTable>) -> Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    serve_on(listener, table).await;
    Ok(())
}

async fn serve_on(listener: TcpListener, table: Arc<agent_files::MountTable>) {
    while let Ok((s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        let table = table.clone();
        tokio::spawn(async move {
            if let Err(e) = agent_files::serve_connection(s, table).await {
                eprintln!("file connection ended: {e}");
            }
        });
    }
}

/// Plays the part named by [`ROLE_ENV`]; `None` when the variable is unset
/// (the test binary runs as a normal test then).
pub fn run_role() -> Option<Result<()>> {
    let role = std::env::var(ROLE_ENV).ok()?;
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return Some(Err(e.into())),
    };
    Some(rt.block_on(async {
        match role.as_str() {
            "agent" => {
                let table = Arc::new(agent_files::MountTable::from_env()?);
                let listen = SocketAddr::from(([0, 0, 0, 0], tpd_wire::names::AGENT_FILES_PORT));
                serve(listen, table).await
            }
            "sidecar" => sidecar_role().await,
            "loopback" => loopback_role().await,
            "clean" => {
                let n = fuse::unmount_under(Path::new(tpd_wire::files::SIDECAR_VOLUMES_DIR));
                println!("tpd-volumes: removed {n} leftover mounts");
                Ok(())
            }
            other => bail!("unknown {ROLE_ENV} {other:?}"),
        }
    }))
}

/// Mounts every volume the agent serves and keeps them until SIGTERM, as the
/// sidecar does once its tunnel is up.
async fn sidecar_role() -> Result<()> {
    let server = std::env::var(SERVER_ENV).context("TPD_VOLUMES_SERVER")?;
    let addr = tokio::net::lookup_host(&server).await?.next().context("agent address")?;
    let shutdown = CancellationToken::new();
    let cfg = fuse::MountConfig::new(addr, PathBuf::from(tpd_wire::files::SIDECAR_VOLUMES_DIR));
    let handle = fuse::mount_all(cfg, shutdown.clone()).await?;
    println!("{MOUNTED}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    shutdown.cancel();
    handle.unmount().await;
    println!("tpd-volumes: unmounted");
    Ok(())
}

/// Serves the volumes in `names::agent_env::MOUNTS` and mounts them under
/// [`LOCAL_ENV`], both in this process as [`LoopbackMount`] does, until
/// SIGTERM: how the volumes bench measures the bridge in a release build
/// (`cargo xtask` itself runs unoptimised).
async fn loopback_role() -> Result<()> {
    let json = std::env::var(tpd_wire::names::agent_env::MOUNTS).context("TPD_AGENT_MOUNTS")?;
    let volumes = tpd_wire::files::parse_mounts(&json)?;
    let local = PathBuf::from(std::env::var(LOCAL_ENV).context("TPD_VOLUMES_LOCAL")?);
    let mut mount = LoopbackMount::start(volumes, &local).await?;
    println!("{MOUNTED}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    mount.shutdown.cancel();
    if let Some(handle) = mount.handle.take() {
        handle.unmount().await;
    }
    Ok(())
}

/// The agent's file service on a loopback port and the FUSE mounts of
/// `volumes` under `local`, all in this process (benchmarks, quick checks).
#[derive(Debug)]
pub struct LoopbackMount {
    pub handle: Option<fuse::MountHandle>,
    pub shutdown: CancellationToken,
}

impl LoopbackMount {
    pub async fn start(volumes: Vec<VolumeMount>, local: &Path) -> Result<Self> {
        let table = Arc::new(agent_files::MountTable::new(volumes));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let server = listener.local_addr()?;
        tokio::spawn(serve_on(listener, table));
        let shutdown = CancellationToken::new();
        let cfg = fuse::MountConfig::new(server, local.to_path_buf());
        let handle = fuse::mount_all(cfg, shutdown.clone()).await?;
        Ok(LoopbackMount { handle: Some(handle), shutdown })
    }
}

/// The real data plane for volumes, without a cluster: the `tpd/agent`
/// image (uid 65532, no capabilities, read-only root) serving host
/// directories as the swapped pod's volumes, and the `tpd/sidecar` image
/// FUSE-mounting them through the WireGuard tunnel (stream transport over
/// TCP on a private Docker network, onto the agent's loopback through
/// [`crate::dataplane::loopback_forwarder`]), into a Docker volume's directory that
/// is bound rshared, so the mounts also appear on this host at
/// [`TunnelMount::paths`]. Everything goes on drop.
#[derive(Debug)]
pub struct TunnelMount {
    /// Where each volume is mounted on this host, in the order given.
    pub paths: Vec<PathBuf>,
    /// The agent container's name.
    pub agent: String,
    /// The sidecar container's name.
    pub sidecar: String,
    /// The shared host directory holding the mounts.
    pub shared: PathBuf,
    pub guard: DockerGuard,
}

/// Gives the agent (first name) and the sidecar's network-less container
/// (second) a path to each other; returns the agent's address on it.
pub type Join<'a> = dyn Fn(&str, &str) -> Result<String> + 'a;

/// Where a [`TunnelMount`]'s sidecar runs and how it reaches the agent.
pub struct Placement<'a> {
    /// Given the agent's and a network-less container's names, gives them
    /// a path to each other (e.g. across an emulated WAN link) and returns
    /// the agent's address on it; the sidecar then runs in that container's
    /// network namespace. Without it, both share a private Docker network.
    pub join: Option<&'a Join<'a>>,
    /// The UDP transport (its hello over the forwarder's TCP stream)
    /// instead of the framed stream.
    pub udp: bool,
    /// The sidecar's `--volume-cache`.
    pub cache: bool,
}

/// Labels of every Docker object a [`TunnelMount`] creates.
const TUNNEL_LABELS: [&str; 4] = ["--label", "tpd.test=1", "--label", "tpd.test.volumes=1"];

impl TunnelMount {
    /// Starts agent and sidecar for `volumes` (`(host dir, mount)` pairs) with
    /// the images `agent_image` and `sidecar_image`, and returns once the
    /// sidecar reports ready (its volumes are mounted by then).
    pub fn start(volumes: &[(PathBuf, VolumeMount)], agent_image: &str, sidecar_image: &str) -> Result<Self> {
        let placement = Placement { join: None, udp: false, cache: true };
        TunnelMount::start_placed(volumes, agent_image, sidecar_image, &placement)
    }

    /// [`TunnelMount::start`] with the sidecar where `placement` says.
    pub fn start_placed(
        volumes: &[(PathBuf, VolumeMount)],
        agent_image: &str,
        sidecar_image: &str,
        placement: &Placement,
    ) -> Result<Self> {
        // The forwarder onto the agent's loopback runs the echo image.
        crate::images::ensure()?;
        let mut guard = DockerGuard::default();
        let tag = format!(
            "{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos()
        );
        let net = format!("tpd-vol-tnet-{tag}");
        let mut args = vec!["network", "create", "--internal"];
        args.extend(TUNNEL_LABELS);
        args.push(&net);
        docker(&args)?;
        guard.networks.push(net.clone());

        let mounts: Vec<VolumeMount> = volumes.iter().map(|(_, v)| v.clone()).collect();
        let agent = format!("tpd-vol-tagent-{tag}");
        let mut a: Vec<String> = ["run", "-d", "--name", &agent, "--network", &net].map(String::from).to_vec();
        a.extend(TUNNEL_LABELS.map(String::from));
        a.extend([
            "--user".into(),
            tpd_wire::names::AGENT_UID.to_string(),
            "--cap-drop".into(),
            "ALL".into(),
            "--read-only".into(),
        ]);
        a.extend([
            "-e".into(),
            format!("{}={}", tpd_wire::names::agent_env::MOUNTS, tpd_wire::files::mounts_env_value(&mounts)),
        ]);
        for (host, v) in volumes {
            let ro = if v.read_only { ":ro" } else { "" };
            a.extend(["-v".into(), format!("{}:{}{ro}", host.display(), v.mount_path)]);
        }
        a.push(agent_image.into());
        guard.containers.push(agent.clone());
        docker(&a.iter().map(String::as_str).collect::<Vec<_>>())
            .context("starting the agent (run `cargo xtask images`)")?;
        let agent_ip = docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &agent])?;
        let forwarder = format!("tpd-vol-tforward-{tag}");
        let mut f: Vec<String> = ["run", "-d"].map(String::from).to_vec();
        f.extend(TUNNEL_LABELS.map(String::from));
        f.extend(crate::dataplane::loopback_forwarder(&forwarder, &agent));
        guard.containers.push(forwarder);
        docker(&f.iter().map(String::as_str).collect::<Vec<_>>()).context("starting the forwarder to the agent")?;

        let vol = format!("tpd-vol-tshared-{tag}");
        let mut v = vec!["volume", "create"];
        v.extend(&TUNNEL_LABELS[..2]);
        v.push(&vol);
        docker(&v)?;
        guard.volumes.push(vol.clone());
        let shared = PathBuf::from(docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &vol])?);
        guard.mount_dirs.push(shared.clone());
        let plan = mounts::plan(&shared.to_string_lossy(), &mounts, mounts::DEFAULT_MOUNT_ROOT);

        let (network, agent_ip) = match placement.join {
            Some(join) => {
                let owner = format!("tpd-vol-towner-{tag}");
                let mut o: Vec<&str> = vec!["run", "-d", "--name", &owner, "--network", "none"];
                o.extend(TUNNEL_LABELS);
                o.extend([crate::images::DEBIAN, "sleep", "infinity"]);
                guard.containers.push(owner.clone());
                docker(&o)?;
                (format!("container:{owner}"), join(&agent, &owner)?)
            }
            None => (net.clone(), agent_ip),
        };
        let sidecar = format!("tpd-vol-tsidecar-{tag}");
        let session = tempfile::tempdir()?;
        let mut s: Vec<String> = ["run", "-d", "--name", &sidecar, "--network", &network].map(String::from).to_vec();
        s.extend(TUNNEL_LABELS.map(String::from));
        s.extend(
            ["--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN", "--device", "/dev/net/tun", "--device", "/dev/fuse"]
                .map(String::from),
        );
        s.extend(["--security-opt".into(), "apparmor=unconfined".into()]);
        // With the volumes' info lines: [`TunnelMount::requests`] reads one.
        s.extend(["-e".into(), "TPD_SIDECAR_LOG=tpd_sidecar=info,tpd_volumes=info,warn".into()]);
        s.extend(["-v".into(), format!("{}:{}", session.path().display(), tpd_wire::names::SESSION_DIR)]);
        for m in &plan.sidecar {
            s.extend(["--mount".into(), mount_flag(m)]);
        }
        s.push(sidecar_image.into());
        let mut config = sidecar_config(&agent_ip, placement.udp)?;
        // The file service is on the agent's tunnel address; the Docker
        // network must stay out of the tunnel (it carries it).
        config.routes = vec!["10.96.0.0/12".parse().map_err(anyhow::Error::msg)?];
        config.volumes =
            Some(tpd_wire::sidecar::Volumes { retry_for: std::time::Duration::from_secs(30), cache: placement.cache });
        s.extend(["run".into(), "--config".into(), serde_json::to_string(&config)?]);
        guard.containers.push(sidecar.clone());
        docker(&s.iter().map(String::as_str).collect::<Vec<_>>())
            .context("starting the sidecar (run `cargo xtask images`)")?;
        wait_for_log(&sidecar, "\"ready\"", std::time::Duration::from_secs(60))?;
        let paths =
            mounts.iter().enumerate().map(|(i, v)| shared.join(tpd_wire::files::mount_dir_name(i, &v.name))).collect();
        Ok(TunnelMount { paths, agent, sidecar, shared, guard })
    }
}

impl TunnelMount {
    /// Stops the sidecar (which unmounts) and returns how many file
    /// requests its mounts sent, from the line it logs on unmounting (an
    /// error when it exited before logging it).
    pub fn requests(&self) -> Result<u64> {
        docker(&["stop", "-t", "10", &self.sidecar])?;
        let out = Command::new("docker").args(["logs", &self.sidecar]).output().context("docker logs")?;
        let logs = strip_ansi(&String::from_utf8_lossy(&out.stderr));
        let line = logs.lines().rev().find(|l| l.contains("file requests sent")).context("no request count logged")?;
        let count = line.split("requests=").nth(1).and_then(|r| r.split_whitespace().next());
        count.and_then(|c| c.parse().ok()).with_context(|| format!("no count in {line:?}"))
    }
}

/// `text` without the terminal's colour sequences (`ESC [ … m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// The sidecar's transport to the agent at `agent_ip`: the framed stream
/// through the forwarder, or UDP with its hello through the forwarder.
fn sidecar_config(agent_ip: &str, udp: bool) -> Result<tpd_wire::sidecar::Config> {
    use tpd_wire::sidecar::{Config, Transport};
    let forwarded = format!("stream:tcp:{agent_ip}:{}", crate::dataplane::LOOPBACK_FORWARD_PORT);
    let forwarded: tpd_wire::sidecar::Endpoint = forwarded.parse().map_err(anyhow::Error::msg)?;
    if !udp {
        return Ok(Config::new(Transport::Stream(forwarded)));
    }
    let at = SocketAddr::new(agent_ip.parse()?, tpd_wire::names::AGENT_TRANSPORT_PORT);
    Ok(Config { hello: Some(forwarded), ..Config::new(Transport::Udp(at)) })
}

/// Waits until `container`'s log contains `needle`.
pub fn wait_for_log(container: &str, needle: &str, timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let logs = Command::new("docker").args(["logs", container]).output().context("docker logs")?;
        let text = format!("{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
        if text.contains(needle) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{container} did not print {needle:?} within {timeout:?}:\n{text}");
        }
        crate::interrupt::pause(std::time::Duration::from_millis(100))?;
    }
}

/// Runs `docker` with `args`, returning stdout; fails with stderr.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker").args(args).output().context("running docker")?;
    if !out.status.success() {
        bail!("docker {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Output and exit status of a command in a container.
#[derive(Debug)]
pub struct Exec {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// `docker exec` of a shell command.
pub fn exec(container: &str, user: Option<&str>, script: &str) -> Exec {
    let mut cmd = Command::new("docker");
    cmd.arg("exec");
    if let Some(u) = user {
        cmd.args(["--user", u]);
    }
    let out = cmd.args([container, "sh", "-c", script]).output().expect("docker exec runs");
    Exec {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    }
}

/// A `--mount` flag for a planned Docker mount.
pub fn mount_flag(m: &bollard::models::Mount) -> String {
    let mut s = format!(
        "type=bind,source={},target={}",
        m.source.as_deref().unwrap_or_default(),
        m.target.as_deref().unwrap_or_default()
    );
    if let Some(p) = m.bind_options.as_ref().and_then(|b| b.propagation) {
        s.push_str(&format!(",bind-propagation={p}"));
    }
    if m.read_only == Some(true) {
        s.push_str(",readonly");
    }
    s
}

/// Everything one test created in Docker, removed on drop even on failure:
/// containers, then leftover mounts under the shared directory, then the
/// network and the volume.
#[derive(Debug, Default)]
pub struct DockerGuard {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub volumes: Vec<String>,
    pub mount_dirs: Vec<PathBuf>,
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        for c in self.containers.iter().rev() {
            let _ = Command::new("docker").args(["rm", "-f", "-v", c]).output();
        }
        for d in &self.mount_dirs {
            // The test runs as root on the host, so it can clear what a
            // killed sidecar left; tpd's own cleanup uses a helper container.
            let below = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            for line in below.lines() {
                if let Some(p) = line.split(' ').nth(4).filter(|p| Path::new(p).starts_with(d) && Path::new(p) != d) {
                    let _ = rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH);
                }
            }
        }
        for n in &self.networks {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
        for v in &self.volumes {
            let _ = Command::new("docker").args(["volume", "rm", "-f", v]).output();
        }
    }
}
