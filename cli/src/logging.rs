//! Logging with `tracing`: quiet by default (warnings only), `--verbose` for
//! debug and twice for trace on stderr; `RUST_LOG` overrides the level.
//! Sessions and their background pieces (guardian, relay) also log at debug
//! level to a file under the user's cache directory, so an unexpected error
//! can point at it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

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

/// Starts writing this process's logs to `cache_dir()/NAME.log`.
pub fn to_file(name: &str) -> std::io::Result<PathBuf> {
    let path = cache_dir().join(format!("{name}.log"));
    let file = File::options().create(true).append(true).open(&path)?;
    let _ = LOG_FILE.set((path.clone(), Mutex::new(file)));
    Ok(path)
}

/// The log file, if this process writes one.
pub fn file() -> Option<&'static Path> {
    LOG_FILE.get().map(|(p, _)| p.as_path())
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
