//! One sandbox instance on this machine: its state directory
//! (`~/.cache/tpd-sandbox/<name>/`: pid, port, serve.log, kubeconfig), and
//! `up` / `status` / `down` acting on the background server through it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Covers building the pause image and the network on a cold Docker engine.
const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of serve.log a failed `up` shows.
const LOG_TAIL_LINES: usize = 15;
const DOWN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    pub dir: PathBuf,
}

impl Instance {
    pub fn new(name: &str) -> Result<Self> {
        if !crate::api::admission::validate::is_dns_label(name) {
            bail!(
                "instance name {name:?} must be a DNS label (lower-case letters, digits and '-'), as it prefixes Docker object names"
            );
        }
        let cache = dirs::cache_dir().context("no cache directory: set HOME or XDG_CACHE_HOME")?;
        Ok(Self { name: name.to_owned(), dir: cache.join("tpd-sandbox").join(name) })
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }
    fn port_file(&self) -> PathBuf {
        self.dir.join("port")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("serve.log")
    }
    pub fn default_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// Where `up` wrote the kubeconfig, so `down` removes it too.
    fn kubeconfig_record(&self) -> PathBuf {
        self.dir.join("kubeconfig-path")
    }

    /// Called by `serve` once the API answers: `up` waits for this file.
    pub fn write_ready(&self, port: u16) -> Result<()> {
        std::fs::write(self.pid_file(), std::process::id().to_string()).context("writing the pid file")?;
        let tmp = self.dir.join("port.tmp");
        std::fs::write(&tmp, port.to_string()).context("writing the port file")?;
        std::fs::rename(tmp, self.port_file()).context("writing the port file")
    }

    /// Called by `serve` on a clean exit.
    pub fn clear_ready(&self) {
        let _ = std::fs::remove_file(self.port_file());
        let _ = std::fs::remove_file(self.pid_file());
    }

    fn read_number<T: std::str::FromStr>(path: &Path) -> Option<T> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// The pid and port of a live server that answers `/version`.
    pub fn running(&self) -> Option<(i32, u16)> {
        let pid: i32 = Self::read_number(&self.pid_file())?;
        let port: u16 = Self::read_number(&self.port_file())?;
        (alive(pid) && version_answers(port)).then_some((pid, port))
    }

    pub fn up(&self, kubeconfig: Option<PathBuf>) -> Result<()> {
        let path = kubeconfig.unwrap_or_else(|| self.default_kubeconfig());
        if let Some((pid, port)) = self.running() {
            write_kubeconfig(&path, &self.name, port)?;
            self.record_kubeconfig(&path)?;
            eprintln!("tpd-sandbox {:?} is already running (pid {pid}) at http://127.0.0.1:{port}", self.name);
            println!("{}", path.display());
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        self.clear_ready();
        let mut child = self.spawn_server()?;
        let started = Instant::now();
        let port = loop {
            if let Some(port) = Self::read_number::<u16>(&self.port_file()).filter(|p| version_answers(*p)) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(self.failed_up(&format!("the sandbox server exited ({status}) before its node was ready")));
            }
            if started.elapsed() > UP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.failed_up(&format!("the sandbox node was not ready within {UP_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        write_kubeconfig(&path, &self.name, port)?;
        self.record_kubeconfig(&path)?;
        eprintln!(
            "tpd-sandbox {:?} is up at http://127.0.0.1:{port} (log: {})\nuse it with: export KUBECONFIG={}",
            self.name,
            self.log_file().display(),
            path.display()
        );
        println!("{}", path.display());
        Ok(())
    }

    /// The error for an `up` that did not come up: what happened, the end of
    /// the server's log (the cause is there), and how to clean up.
    fn failed_up(&self, what: &str) -> anyhow::Error {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        anyhow::anyhow!(
            "{what}; last lines of {}:\n{tail}\nrun `tpd-sandbox down --name {}` to remove what it created",
            self.log_file().display(),
            self.name
        )
    }

    /// Remembers every kubeconfig written (one per line), so `down` removes them all.
    fn record_kubeconfig(&self, path: &Path) -> Result<()> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let known = std::fs::read_to_string(self.kubeconfig_record()).unwrap_or_default();
        if known.lines().any(|l| Path::new(l) == path) {
            return Ok(());
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.kubeconfig_record())
            .context("recording the kubeconfig path")?;
        writeln!(file, "{}", path.display()).context("recording the kubeconfig path")
    }

    /// Re-executes this binary as `serve`, detached in its own process group
    /// so a terminal's Ctrl-C does not reach it, logging to the state dir.
    fn spawn_server(&self) -> Result<std::process::Child> {
        let exe = std::env::current_exe().context("locating the tpd-sandbox binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .with_context(|| format!("opening {}", self.log_file().display()))?;
        Command::new(exe)
            .args(["serve", "--name", &self.name])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting the sandbox server")
    }

    pub fn status(&self) -> bool {
        match self.running() {
            Some((pid, port)) => {
                let kubeconfigs = std::fs::read_to_string(self.kubeconfig_record()).unwrap_or_default();
                let kubeconfigs = kubeconfigs.lines().collect::<Vec<_>>().join(", ");
                println!(
                    "tpd-sandbox {:?}: running, pid {pid}, http://127.0.0.1:{port}, kubeconfig {kubeconfigs}",
                    self.name
                );
                true
            }
            None => {
                println!("tpd-sandbox {:?}: not running", self.name);
                false
            }
        }
    }

    /// Stops the server (SIGTERM, then SIGKILL), removes the node's Docker
    /// objects by label, and deletes the instance's files.
    pub async fn down(&self) -> Result<()> {
        if let Some(pid) = Self::read_number::<i32>(&self.pid_file()) {
            stop(pid).await;
        }
        if let Err(e) = crate::kubelet::teardown(&self.name).await {
            eprintln!("warning: removing the sandbox's Docker objects failed: {e:#}");
        }
        for path in std::fs::read_to_string(self.kubeconfig_record()).unwrap_or_default().lines() {
            if !Path::new(path).starts_with(&self.dir) {
                let _ = std::fs::remove_file(path);
            }
        }
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))?;
        }
        eprintln!("tpd-sandbox {:?} is down", self.name);
        Ok(())
    }
}

async fn stop(pid: i32) {
    if !alive(pid) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let started = Instant::now();
    while alive(pid) && started.elapsed() < DOWN_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if alive(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// A process that exists and is not a zombie.
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// A plain HTTP/1.1 GET of `/version` on loopback.
fn version_answers(port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    };
    probe().unwrap_or(false)
}

pub fn kubeconfig_text(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\nusers:\n- name: {name}\n  user:\n    token: tpd-sandbox\n"
    )
}

fn write_kubeconfig(path: &Path, name: &str, port: u16) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, kubeconfig_text(name, port))
        .with_context(|| format!("writing the kubeconfig {}", path.display()))
}
