//! The host tools the build, tests and demo need beyond Rust and Docker.
//! On a fresh Debian machine, as root, they are installed with apt-get;
//! otherwise the exact command to run is printed.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// (a file that shows the tool is there, the Debian package that has it)
const NEEDED: &[(&str, &str)] = &[
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/mmdebstrap", "mmdebstrap"),
    ("/usr/bin/fusermount3", "fuse3"),
    ("/usr/sbin/ip", "iproute2"),
    // `tpd run -it` is tested in a real terminal.
    ("/usr/bin/tmux", "tmux"),
];

/// Installs (or names) whatever of [`NEEDED`] is missing.
pub fn ensure() -> Result<()> {
    let missing: Vec<&str> = NEEDED.iter().filter(|(path, _)| !Path::new(path).exists()).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    if !is_root || !Path::new("/usr/bin/apt-get").exists() {
        bail!("missing tools: install them with `sudo apt-get install {}`", missing.join(" "));
    }
    eprintln!("installing {} with apt-get…", missing.join(" "));
    crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run(
        Command::new("apt-get").args(["install", "-y", "-qq"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
