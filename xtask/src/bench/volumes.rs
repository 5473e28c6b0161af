//! `cargo xtask bench volumes`: the volume bridge two ways, against sshfs
//! over loopback (openssh-server + sshfs, default options, a throwaway key,
//! sshd on 127.0.0.1 only) and the local disk, same tree, same run:
//!
//! - **tpd over loopback**: the agent's file service and the sidecar's FUSE
//!   client in one process over loopback TCP, without the tunnel: the
//!   bridge's own cost. `cargo xtask` runs unoptimised, so that process is
//!   the e2e volumes test binary built with `--release`, playing its
//!   `loopback` role (`tpd_e2e::volumes::LOCAL_ENV`);
//! - **tpd through the tunnel**: what a user gets, minus the cluster: the
//!   `tpd/agent` container (uid 65532, read-only) serving the tree and the
//!   `tpd/sidecar` container FUSE-mounting it through the WireGuard tunnel
//!   (agent's userspace TCP/IP stack, stream transport over TCP between the
//!   two containers), measured on the host through the rshared mount
//!   (`tpd_e2e::volumes::TunnelMount`). `TPD_AGENT_IMAGE` and
//!   `TPD_SIDECAR_IMAGE` choose other images than this version's.
//!
//! Each workload runs on a fresh mount, so no target starts with the names
//! or attributes an earlier workload cached. Besides its time, each prints
//! the CPU time the processes serving it used ([`super::cpu`]): tpd's
//! agent and sidecar (or the loopback process), against sshd and sshfs
//! with their children; the reader's own is left out. Needs root (FUSE mounts, sshd),
//! /dev/fuse, Docker with the tpd images (`cargo xtask images`), and
//! `apt-get install openssh-server sshfs`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::io::BufRead;

use anyhow::{Context, Result, bail};
use tpd_e2e::volumes::{LOCAL_ENV, MOUNTED, ROLE_ENV, TunnelMount};
use tpd_wire::files::{VolumeMount, mount_dir_name, mounts_env_value};

use super::Figure;
use super::cpu::Processes;

mod npm;

const BIG_MIB: usize = 256;
const STAT_FILES: usize = 5_000;
const SMALL_FILES: usize = 1_000;
const SMALL_SIZE: usize = 4 << 10;

/// Runs every workload on tpd, sshfs and the local disk.
pub fn run() -> Result<Vec<Figure>> {
    let work = tempfile::Builder::new().prefix("tpd-bench-volumes").tempdir()?;
    let src = work.path().join("src");
    make_tree(&src)?;
    // The agent runs as uid 65532: it must be able to create the written file.
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let images = tunnel_images();
    let loopback = release_loopback()?;
    let sshd = Sshd::start(work.path())?;
    let mut figures = Vec::new();
    for w in WORKLOADS {
        super::go_on()?;
        let tpd = measure_loopback(&loopback, &src, work.path(), w)?;
        super::go_on()?;
        let tunnel = measure_tunnel(&images, &src, w)?;
        super::go_on()?;
        let ssh = sshd.measure(&src, work.path(), w)?;
        let local = (w.run)(&src)?;
        let (value, base, local_value) = (w.figure)(tpd.took, ssh.took, local);
        let (through_tunnel, _, _) = (w.figure)(tunnel.took, ssh.took, local);
        let sshfs = "sshfs over loopback";
        figures.push(Figure::new(format!("volumes {} (tpd, loopback)", w.name), value, w.unit).against(sshfs, base));
        figures.push(
            Figure::new(format!("volumes {} (tpd, tunnel)", w.name), through_tunnel, w.unit).against(sshfs, base),
        );
        figures.push(Figure::new(format!("volumes {} (local disk)", w.name), local_value, w.unit));
        for (how, run) in [("loopback", tpd), ("tunnel", tunnel)] {
            figures.push(
                Figure::new(format!("volumes {} CPU (tpd, {how})", w.name), ms(run.cpu), "ms")
                    .against(format!("{sshfs} (sshd, sshfs, ssh)"), ms(ssh.cpu)),
            );
        }
    }
    Ok(figures)
}

/// One workload on one file system: how long it took, and the CPU time
/// the processes serving it used meanwhile (tpd's, or sshd's and sshfs's
/// with their children), the reader's own left out.
#[derive(Debug, Clone, Copy)]
struct Run {
    took: Duration,
    cpu: Duration,
}

impl Run {
    fn of(serving: &Processes, work: impl FnOnce() -> Result<Duration>) -> Result<Run> {
        let (took, cpu) = serving.during(work)?;
        Ok(Run { took, cpu })
    }
}

pub struct Workload {
    pub name: &'static str,
    pub unit: &'static str,
    pub run: fn(&Path) -> Result<Duration>,
    /// (tpd, sshfs, local) durations -> the figures' values.
    pub figure: fn(Duration, Duration, Duration) -> (f64, f64, f64),
}

fn mib_per_s(d: Duration) -> f64 {
    BIG_MIB as f64 / d.as_secs_f64()
}
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "seq read 256 MiB",
        unit: "MiB/s",
        run: seq_read,
        figure: |t, s, l| (mib_per_s(t), mib_per_s(s), mib_per_s(l)),
    },
    Workload {
        name: "seq write 256 MiB",
        unit: "MiB/s",
        run: seq_write,
        figure: |t, s, l| (mib_per_s(t), mib_per_s(s), mib_per_s(l)),
    },
    Workload { name: "stat 5,000 files", unit: "ms", run: stat_many, figure: |t, s, l| (ms(t), ms(s), ms(l)) },
    Workload { name: "read 1,000 x 4 KiB", unit: "ms", run: read_small, figure: |t, s, l| (ms(t), ms(s), ms(l)) },
    Workload { name: "find over the tree", unit: "ms", run: find_tree, figure: |t, s, l| (ms(t), ms(s), ms(l)) },
    Workload { name: "npm ls-style walk", unit: "ms", run: npm::walk, figure: |t, s, l| (ms(t), ms(s), ms(l)) },
];

/// big (256 MiB), many/ (5,000 files), small/ (1,000 x 4 KiB), deep/
/// (nested), app/ (a node_modules tree, see [`npm`]).
pub fn make_tree(src: &Path) -> Result<()> {
    npm::make(&src.join(npm::APP))?;
    for d in ["many", "small"] {
        std::fs::create_dir_all(src.join(d))?;
    }
    let block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let mut big = std::fs::File::create(src.join("big"))?;
    for _ in 0..BIG_MIB {
        big.write_all(&block)?;
    }
    for i in 0..STAT_FILES {
        std::fs::write(src.join(format!("many/f{i:05}")), b"x")?;
    }
    for i in 0..SMALL_FILES {
        std::fs::write(src.join(format!("small/s{i:04}")), &block[i..i + SMALL_SIZE])?;
    }
    for a in 0..10 {
        for b in 0..10 {
            let d = src.join(format!("deep/a{a}/b{b}"));
            std::fs::create_dir_all(&d)?;
            for c in 0..10 {
                std::fs::write(d.join(format!("c{c}")), b"y")?;
            }
        }
    }
    Ok(())
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed())
}

fn seq_read(root: &Path) -> Result<Duration> {
    let mut buf = vec![0u8; 1 << 20];
    timed(|| {
        let mut f = std::fs::File::open(root.join("big"))?;
        let mut total = 0;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        anyhow::ensure!(total == BIG_MIB << 20, "read {total} bytes");
        Ok(())
    })
}

fn seq_write(root: &Path) -> Result<Duration> {
    let block = vec![7u8; 1 << 20];
    let path = root.join("written");
    let d = timed(|| {
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..BIG_MIB {
            f.write_all(&block)?;
        }
        Ok(())
    })?;
    std::fs::remove_file(&path)?;
    Ok(d)
}

fn stat_many(root: &Path) -> Result<Duration> {
    timed(|| {
        for i in 0..STAT_FILES {
            std::fs::metadata(root.join(format!("many/f{i:05}")))?;
        }
        Ok(())
    })
}

fn read_small(root: &Path) -> Result<Duration> {
    timed(|| {
        for i in 0..SMALL_FILES {
            let data = std::fs::read(root.join(format!("small/s{i:04}")))?;
            anyhow::ensure!(data.len() == SMALL_SIZE, "short read");
        }
        Ok(())
    })
}

/// `find` over everything but the node_modules tree (its own workload).
fn find_tree(root: &Path) -> Result<Duration> {
    timed(|| {
        let out = Command::new("find")
            .arg(root)
            .args(["-path", &root.join(npm::APP).to_string_lossy(), "-prune", "-o", "-print"])
            .output()
            .context("running find")?;
        anyhow::ensure!(out.status.success(), "find failed");
        let lines = out.stdout.iter().filter(|b| **b == b'\n').count();
        anyhow::ensure!(lines > STAT_FILES + SMALL_FILES, "find saw only {lines} entries");
        Ok(())
    })
}

/// Builds the e2e volumes test binary with `--release` and returns its path.
fn release_loopback() -> Result<PathBuf> {
    let root = tpd_e2e::images::workspace_root();
    eprintln!("building the volume bridge's loopback fixture (release)…");
    let out = crate::cargo(&root)
        .args(["test", "--release", "--no-run", "-p", "tpd-e2e", "--test", "volumes"])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo")?;
    anyhow::ensure!(out.status.success(), "building the release test binary failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "volumes")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo did not name the volumes test binary")
}

/// Runs workload `w` on a loopback mount of `src` served and mounted by the
/// release binary `bin`, which is stopped (and unmounts) afterwards.
fn measure_loopback(bin: &Path, src: &Path, work: &Path, w: &Workload) -> Result<Run> {
    let local = work.join("tpd");
    std::fs::create_dir_all(&local)?;
    let volume = VolumeMount {
        name: "bench".into(),
        mount_path: src.to_string_lossy().into_owned(),
        read_only: false,
        sub_path: None,
    };
    let mut child = Command::new(bin)
        .args(["container_role", "--exact", "--ignored", "--nocapture", "--quiet"])
        .env(ROLE_ENV, "loopback")
        .env(tpd_wire::names::agent_env::MOUNTS, mounts_env_value(&[volume]))
        .env(LOCAL_ENV, &local)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the loopback fixture")?;
    let mut stdout = std::io::BufReader::new(child.stdout.take().context("fixture stdout")?);
    let mut line = String::new();
    let mut mounted = false;
    while !mounted && stdout.read_line(&mut line)? > 0 {
        mounted = line.contains(MOUNTED);
        line.clear();
    }
    // The fixture's later output (the test harness's summary) must find a reader.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let result = if mounted {
        Run::of(&Processes::new([child.id()]), || (w.run)(&local.join(mount_dir_name(0, "bench"))))
    } else {
        Err(anyhow::anyhow!("the loopback fixture exited before mounting"))
    };
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    // A fixture killed by Ctrl-C (it shares the terminal's process group)
    // leaves its mount behind, dead; without this the work directory
    // could not be removed either.
    let _ = Command::new("fusermount").args(["-u", "-z", "-q"]).arg(local.join(mount_dir_name(0, "bench"))).status();
    result
}

/// `(agent, sidecar)` images: this version's, or `TPD_AGENT_IMAGE` / `TPD_SIDECAR_IMAGE`.
pub fn tunnel_images() -> (String, String) {
    let image = |var: &str, repo: &str| std::env::var(var).unwrap_or_else(|_| format!("{repo}:{}", tpd_wire::VERSION));
    (
        image("TPD_AGENT_IMAGE", tpd_wire::names::AGENT_IMAGE_REPO),
        image("TPD_SIDECAR_IMAGE", tpd_wire::names::SIDECAR_IMAGE_REPO),
    )
}

fn measure_tunnel(images: &(String, String), src: &Path, w: &Workload) -> Result<Run> {
    let volume = VolumeMount { name: "bench".into(), mount_path: "/bench".into(), read_only: false, sub_path: None };
    let mount = TunnelMount::start(&[(src.to_path_buf(), volume)], &images.0, &images.1)
        .context("starting agent and sidecar containers")?;
    let serving = Processes::containers(&[&mount.agent, &mount.sidecar])?;
    Run::of(&serving, || (w.run)(&mount.paths[0]))
}

/// sshd with a throwaway host and client key, for sshfs: on 127.0.0.1, or
/// in another network namespace ([`Sshd::start_at`]).
pub struct Sshd {
    child: Child,
    port: u16,
    key: PathBuf,
    at: Option<SshAt>,
}

/// sshd in `server_netns` on `listen`, and sshfs's ssh client in
/// `client_netns` (the FUSE daemon stays in ours, so the mount is ours).
#[derive(Debug, Clone)]
pub struct SshAt {
    pub server_netns: String,
    pub listen: std::net::Ipv4Addr,
    pub client_netns: String,
}

impl Sshd {
    fn start(work: &Path) -> Result<Self> {
        Sshd::start_at(work, None)
    }

    pub fn start_at(work: &Path, at: Option<SshAt>) -> Result<Self> {
        let listen = at.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |a| a.listen);
        let dir = work.join("ssh");
        std::fs::create_dir_all(&dir)?;
        let (host_key, key) = (dir.join("host_key"), dir.join("client_key"));
        for k in [&host_key, &key] {
            let _ = std::fs::remove_file(k);
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(k)
                .status()
                .context("ssh-keygen is missing: apt-get install openssh-server sshfs")?;
            anyhow::ensure!(ok.success(), "ssh-keygen failed");
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let port = free_port()?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress {listen}\nHostKey {}\nAuthorizedKeysFile {}\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nPidFile {}\nSubsystem sftp internal-sftp\n",
                host_key.display(),
                dir.join("authorized_keys").display(),
                dir.join("sshd.pid").display()
            ),
        )?;
        std::fs::create_dir_all("/run/sshd")?;
        let child = in_netns(at.as_ref().map(|a| a.server_netns.as_str()), "/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .context("starting sshd (apt-get install openssh-server sshfs)")?;
        let sshd = Sshd { child, port, key, at };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sshd.listening() {
            anyhow::ensure!(Instant::now() < deadline, "sshd did not listen on {listen}:{port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(sshd)
    }

    /// Whether sshd accepts connections yet, asked from its own namespace.
    fn listening(&self) -> bool {
        let Some(at) = &self.at else { return std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() };
        let connect = format!("import socket; socket.create_connection(('{}', {}), 1)", at.listen, self.port);
        in_netns(Some(&at.server_netns), "python3").args(["-c", &connect]).output().is_ok_and(|o| o.status.success())
    }

    fn measure(&self, src: &Path, work: &Path, w: &Workload) -> Result<Run> {
        let mnt = self.mount(src, work)?;
        let result =
            daemon_serving(&mnt).and_then(|sshfs| Run::of(&Processes::new([self.child.id(), sshfs]), || (w.run)(&mnt)));
        let _ = Command::new("fusermount").arg("-u").arg(&mnt).status();
        result
    }

    /// Mounts `src` with sshfs (default options) at `work/sshfs`; the caller
    /// unmounts it with `fusermount -u`.
    pub fn mount(&self, src: &Path, work: &Path) -> Result<PathBuf> {
        let mnt = work.join("sshfs");
        std::fs::create_dir_all(&mnt)?;
        let mut options = format!(
            "IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,LogLevel=ERROR",
            self.key.display()
        );
        if let Some(at) = &self.at {
            // sshfs splits ssh_command on spaces.
            options.push_str(&format!(",ssh_command=ip netns exec {} ssh", at.client_netns));
        }
        let listen = self.at.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |a| a.listen);
        let status = Command::new("sshfs")
            .arg(format!("root@{listen}:{}", src.display()))
            .arg(&mnt)
            .args(["-p", &self.port.to_string(), "-o", &options])
            .status()
            .context("running sshfs")?;
        if !status.success() {
            bail!("sshfs mount failed ({status})");
        }
        Ok(mnt)
    }
}

/// The sshfs daemon serving the mount at `mnt` (it forks into the
/// background, so it is found by its command line).
fn daemon_serving(mnt: &Path) -> Result<u32> {
    let mnt = mnt.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let mut args = cmdline.split(|b| *b == 0);
            args.next().is_some_and(|prog| prog.ends_with(b"sshfs")) && args.any(|a| a == mnt)
        })
        .context("the sshfs process serving the benchmark's mount was not found")
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program`, run in network namespace `netns` when one is given.
fn in_netns(netns: Option<&str>, program: &str) -> Command {
    let Some(netns) = netns else { return Command::new(program) };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, program]);
    cmd
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
