//! Named network namespaces (`ip netns add`, so that `ip netns exec NAME`
//! and `ip -n NAME` reach them) and running code inside one. `setns`
//! changes the namespace of the calling thread only, so [`enter`] runs its
//! closure on a thread of its own that ends right after; a socket or TUN
//! device keeps the namespace it was created in.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::process::Command;

use nix::sched::CloneFlags;

use crate::{Error, Result};

/// Where `ip netns add` mounts a namespace.
const RUN_NETNS: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(RUN_NETNS).join(name)
}

pub fn add(name: &str) -> Result<()> {
    ip(&["netns", "add", name])
}

/// Deletes a namespace; what still runs inside keeps it alive until it exits.
pub fn delete(name: &str) -> Result<()> {
    ip(&["netns", "delete", name])
}

/// Runs `f` on a thread of its own in namespace `name` and returns its result.
pub fn enter<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(path(name)).map_err(|source| Error::Io { what: format!("opening netns {name}"), source })?;
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn_scoped(scope, move || {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok::<_, io::Error>(f())
            })
            .map_err(|source| Error::Io { what: "starting a thread".into(), source })?;
        match thread.join() {
            Ok(result) => result.map_err(|source| Error::Io { what: format!("entering netns {name}"), source }),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `ip ARGS`; a failure carries the command and what it printed.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| Error::Io { what: "running ip (iproute2)".into(), source })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Deletes the namespaces that links of processes no longer running left
/// behind (a run killed before its `Drop`): `PREFIX<pid>-…`.
pub fn delete_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(RUN_NETNS) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(prefix).and_then(|rest| rest.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            let _ = delete(&name);
        }
    }
}
