//! A sandbox cluster for a test: `Sandbox::up()` builds and starts a
//! uniquely named `tpd-sandbox` instance with its own kubeconfig, and its
//! `Drop` runs `tpd-sandbox down`, which removes the server, every Docker
//! object of the instance (by label) and its files, even when the test failed.
//!
//! The sandbox's address plan (one Docker network at a fixed subnet) allows
//! one instance per machine at a time, so `up` waits for a machine-wide lock
//! that the instance holds until it is dropped: a test binary runs its steps
//! against one instance in one test rather than starting one per test.
//!
//! ```no_run
//! let sb = tpd_e2e::sandbox::Sandbox::up().unwrap();
//! let out = sb.kubectl_ok(&["get", "nodes"]).unwrap();
//! ```

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::home::Home;
use crate::images;

/// Set to keep the instance after the test (to debug it with kubectl).
pub const KEEP_ENV: &str = "TPD_SANDBOX_KEEP";

pub struct Sandbox {
    /// The instance name (`tpd-sandbox --name`).
    pub name: String,
    /// The kubeconfig `up` wrote (server `http://127.0.0.1:<port>`).
    pub kubeconfig: PathBuf,
    /// The fresh home every `tpd` aimed at this instance runs with
    /// (`tpd_e2e::session::tpd`).
    pub home: Home,
    bin: PathBuf,
    dir: tempfile::TempDir,
    _lock: File,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("name", &self.name)
            .field("kubeconfig", &self.kubeconfig)
            .finish_non_exhaustive()
    }
}

/// Builds `tpd-sandbox` once per test process (a no-op when up to date) and
/// returns its path; `TPD_SANDBOX_BIN` overrides.
pub fn binary() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    images::cargo_binary(&BIN, "tpd-sandbox", "tpd-sandbox", "TPD_SANDBOX_BIN")
}

fn machine_lock() -> Result<File> {
    let lock = File::create(std::env::temp_dir().join("tpd-sandbox-instance.lock"))
        .context("creating the sandbox lock file")?;
    lock.lock().context("waiting for the machine's sandbox lock")?;
    Ok(lock)
}

/// Removes the instances earlier test processes left: one killed before its
/// teardown, or one kept with the keep variable. While this process holds
/// the machine's lock no other test owns one, and any would keep the
/// sandbox's subnet from the next.
fn remove_stale(bin: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir().join("tpd-sandbox")) else {
        return;
    };
    let names = entries.flatten().filter_map(|e| e.file_name().into_string().ok());
    for name in names.filter(|n| n.starts_with("tpd-e2e-")) {
        eprintln!("removing sandbox {name}, which an earlier test process left");
        match Command::new(bin).args(["down", "--name", &name]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("tpd-sandbox down {name} failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("tpd-sandbox down {name} failed: {e}"),
        }
    }
}

impl Sandbox {
    /// Starts a fresh instance named `tpd-e2e-<pid>-<n>`.
    pub fn up() -> Result<Self> {
        Self::up_with(binary()?)
    }

    /// Starts a fresh instance of the given `tpd-sandbox` binary (e.g. a
    /// release build for benchmarks).
    pub fn up_with(bin: PathBuf) -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let lock = machine_lock()?;
        remove_stale(&bin);
        let name = format!("tpd-e2e-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::tempdir().context("creating the kubeconfig directory")?;
        let kubeconfig = dir.path().join("kubeconfig");
        let sandbox = Self { name, kubeconfig, home: Home::new()?, bin, dir, _lock: lock };
        let out =
            sandbox.tool(&["up", "--name", &sandbox.name, "--kubeconfig", &sandbox.kubeconfig.to_string_lossy()])?;
        if !out.status.success() {
            bail!("tpd-sandbox up failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(sandbox)
    }

    /// Runs the `tpd-sandbox` binary with `args`.
    pub fn tool(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin).args(args).output().with_context(|| format!("running {}", self.bin.display()))
    }

    /// A `kubectl` command aimed at this instance (its own discovery cache).
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.kubeconfig).env("KUBECACHEDIR", self.dir.path().join("kube-cache"));
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs kubectl and returns its stdout, or fails with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl().args(args).output().context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON); returns what
    /// kubectl printed.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        let mut child = self
            .kubectl()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        child.stdin.take().context("kubectl's stdin")?.write_all(manifest.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits, as `kubectl rollout status` does, until every replica of
    /// `deployment` in `ns` runs its latest template.
    pub fn rolled_out(&self, ns: &str, deployment: &str) -> Result<()> {
        let target = format!("deployment/{deployment}");
        self.kubectl_ok(&["rollout", "status", &target, "-n", ns, "--timeout", "90s"]).map(drop)
    }

    /// A kube-rs client from the instance's kubeconfig.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).context("reading the kubeconfig")?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .context("loading the kubeconfig")?;
        kube::Client::try_from(config).context("building the kube client")
    }

    /// The instance's state directory (`serve.log` is there).
    pub fn state_dir(&self) -> PathBuf {
        cache_dir().join("tpd-sandbox").join(&self.name)
    }

    /// Closes every open pods/portforward stream from the server's side
    /// (SIGUSR1 to the server), as a real cluster drops a long-lived
    /// connection. Returns how many streams were open, read back from the
    /// line the server logs, so a test knows its fault hit something.
    pub fn cut_streams(&self) -> Result<usize> {
        let log = self.state_dir().join("serve.log");
        let cuts_logged = || -> Result<Vec<String>> {
            let text = std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
            Ok(text.lines().filter(|l| l.contains(CUT_MARKER)).map(str::to_owned).collect())
        };
        let before = cuts_logged()?.len();
        let pid = std::fs::read_to_string(self.state_dir().join("pid")).context("reading the server's pid")?;
        let sent = Command::new("kill").args(["-USR1", pid.trim()]).status().context("running kill")?;
        if !sent.success() {
            bail!("kill -USR1 {} failed", pid.trim());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = cuts_logged()?.get(before) {
                return streams_in(line).with_context(|| format!("no stream count in {line:?}"));
            }
            if Instant::now() > deadline {
                bail!("the server did not log {CUT_MARKER:?} within 5 s of SIGUSR1");
            }
            crate::interrupt::pause(Duration::from_millis(20))?;
        }
    }
}

/// What the server logs on SIGUSR1 (tests/sandbox/src/main.rs), followed by `streams=N`.
const CUT_MARKER: &str = "SIGUSR1: closing every port-forward stream";

/// N of the `streams=N` field in a server log line.
fn streams_in(line: &str) -> Option<usize> {
    line.split_whitespace().find_map(|w| w.strip_prefix("streams="))?.parse().ok()
}

/// The user's cache directory, where tpd and the sandbox keep state and logs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
}

/// How much of the server's log a test's output carries.
const LOG_TAIL_LINES: usize = 40;

impl Sandbox {
    /// The end of the server's log, printed on drop when a test panicked or
    /// the server logged an error: the harness shows a test's output only
    /// when it fails, which is when the log explains why; the demo, which
    /// uses this fixture too, stays quiet.
    fn print_log_tail(&self) {
        let log = std::fs::read_to_string(self.state_dir().join("serve.log")).unwrap_or_default();
        if !std::thread::panicking() && !log.contains(" ERROR ") {
            return;
        }
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        eprintln!("--- last {} lines of the sandbox server log ({}) ---\n{}", tail.len(), self.name, tail.join("\n"));
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.print_log_tail();
        if std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("keeping sandbox {} (kubeconfig {})", self.name, self.kubeconfig.display());
            return;
        }
        match self.tool(&["down", "--name", &self.name]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("tpd-sandbox down {} failed: {}", self.name, String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("tpd-sandbox down {} failed: {e:#}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_count_of_a_cut_line() {
        let line = "2026-11-30T10:00:00Z  INFO tpd_sandbox: SIGUSR1: closing every port-forward stream streams=3";
        assert_eq!(streams_in(line), Some(3));
        assert_eq!(streams_in("no count here"), None);
    }
}
