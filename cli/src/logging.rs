//! Logging with `tracing`: quiet by default (warnings only), `--verbose` for
//! debug and twice for trace on stderr; `RUST_LOG` overrides the level.
//! Sessions and their background pieces (guardian, relay) also log at debug
//! level to a file under the user's cache directory, so an unexpected error
//! can point at it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static LOG_FILE: OnceLock<(PathBuf, Mutex<File>)> = OnceLock::new();

/// Installs the subscriber for this process: stderr, plus the log file once
/// [`to_file`] is called.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "tpd=debug,info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let stderr =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(verbose > 1).with_filter(filter);
    let file = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(|| FileWriter)
        .with_filter(EnvFilter::new("tpd=debug,kube=info,warn"));
    tracing_subscriber::registry().with(stderr).with(file).init();
}

/// `~/.cache/tpd/` (or the platform's cache dir), created on demand.
pub fn cache_dir() -> PathBuf {
    let dir = dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("tpd");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// How many logs of past sessions the cache directory keeps, and for how long.
const KEEP_LOGS: usize = 100;
const KEEP_FOR: Duration = Duration::from_secs(14 * 24 * 3600);

/// Starts writing this process's logs to `cache_dir()/NAME.log`, after
/// pruning the logs of old sessions (each session writes one or two).
pub fn to_file(name: &str) -> std::io::Result<PathBuf> {
    prune(&cache_dir(), KEEP_LOGS, KEEP_FOR);
    let path = cache_dir().join(format!("{name}.log"));
    let file = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot open the log file {}: {e}", path.display())))?;
    let _ = LOG_FILE.set((path.clone(), Mutex::new(file)));
    Ok(path)
}

/// The log file, if this process writes one.
pub fn file() -> Option<&'static Path> {
    LOG_FILE.get().map(|(p, _)| p.as_path())
}

/// Removes the `*.log` files in `dir` older than `max_age`, and all but the
/// newest `keep` of the rest; returns how many it removed. Best effort: a
/// file another process removed first is not an error.
pub fn prune(dir: &Path, keep: usize, max_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut logs: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    logs.sort_by_key(|log| std::cmp::Reverse(log.0));
    let now = SystemTime::now();
    let old = |t: &SystemTime| now.duration_since(*t).is_ok_and(|age| age > max_age);
    logs.iter()
        .enumerate()
        .filter(|(i, (t, _))| *i >= keep || old(t))
        .filter(|(_, (_, path))| std::fs::remove_file(path).is_ok())
        .count()
}

struct FileWriter;

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match LOG_FILE.get() {
            Some((_, file)) => file.lock().map_or(Ok(buf.len()), |mut f| f.write(buf)),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_aged(dir: &Path, name: &str, age: Duration) {
        let path = dir.join(name);
        std::fs::write(&path, "x").unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn prune_keeps_the_newest_logs_and_drops_old_ones() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5u64 {
            log_aged(dir.path(), &format!("s{i}.log"), Duration::from_secs(60 * (i + 1)));
        }
        log_aged(dir.path(), "ancient.log", Duration::from_secs(30 * 24 * 3600));
        std::fs::write(dir.path().join("config.toml"), "kept").unwrap();

        assert_eq!(prune(dir.path(), 3, KEEP_FOR), 3);
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["config.toml", "s0.log", "s1.log", "s2.log"]);
    }
}
