//! The kernel's readahead window on each volume mount.
//!
//! FUSE's INIT answer can only lower a mount's readahead below the kernel's
//! default of 128 KiB, so sequential reads would come as 128 KiB requests,
//! too few in flight to fill the tunnel. The window is the mount's backing
//! device's `read_ahead_kb` in sysfs, which Docker mounts read-only in the
//! sidecar: we write it through a private sysfs instance (`fsopen` +
//! `fsmount`), attached nowhere and gone when its descriptor closes. That
//! instance shares the network namespace's superblock, which Docker made
//! read-only too, so the flag is lifted for the one write and restored;
//! the containers' /sys mounts stay read-only all along. The device is the
//! FUSE connection's and goes with the mount; nothing outlives the session.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::mount::{FsMountFlags, FsOpenFlags, FsPickFlags, MountAttrFlags};
use tpd_wire::files;

/// Four read requests' worth: a sequential reader then has up to four
/// requests in flight. Near the cluster 512 KiB to 8 MiB measured alike
/// (128 KiB about 40% slower); across a WAN the window is what one round
/// trip can bring, and at 1 MiB reads at 20 ms stopped at 41 MiB/s
/// (BENCHMARKS.md, "Volumes over the link").
pub const READ_AHEAD_KB: u32 = 4 * files::MAX_IO / 1024;

/// Widens the readahead of the mount at `point`. Best effort: without
/// sysfs access (rootless Docker, an AppArmor profile) reads still work, at
/// the kernel's default window, and the log says so once per mount.
pub(super) fn widen(point: &Path) {
    let outcome = std::fs::read_to_string("/proc/self/mountinfo")
        .and_then(|table| {
            super::device_of(&table, point)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not in /proc/self/mountinfo"))
        })
        .and_then(|device| write_read_ahead(&device));
    match outcome {
        Ok(()) => tracing::debug!(path = %point.display(), kib = READ_AHEAD_KB, "volume readahead widened"),
        Err(e) => tracing::info!(
            path = %point.display(),
            error = %e,
            "cannot widen the volume's readahead; sequential reads keep the kernel's 128 KiB window"
        ),
    }
}

fn write_read_ahead(device: &str) -> io::Result<()> {
    let sysfs = private_sysfs()?;
    let setting = format!("class/bdi/{device}/read_ahead_kb");
    match write_at(&sysfs, &setting) {
        // Docker mounts the sysfs of the container's network namespace
        // read-only, and every mount of it shares that superblock: lift the
        // flag for this one write and put it back. The containers' own /sys
        // mounts stay read-only throughout (their mounts are flagged too).
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error()) => {
            set_read_only(&sysfs, false)?;
            let written = write_at(&sysfs, &setting);
            let restored = set_read_only(&sysfs, true);
            written.and(restored)
        }
        other => other,
    }
}

fn write_at(dir: &OwnedFd, path: &str) -> io::Result<()> {
    let file = rustix::fs::openat(dir, path, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    std::fs::File::from(file).write_all(READ_AHEAD_KB.to_string().as_bytes())
}

fn set_read_only(mount: &OwnedFd, read_only: bool) -> io::Result<()> {
    let fs = rustix::mount::fspick(mount, "", FsPickFlags::FSPICK_EMPTY_PATH | FsPickFlags::FSPICK_CLOEXEC)?;
    rustix::mount::fsconfig_set_flag(&fs, if read_only { "ro" } else { "rw" })?;
    Ok(rustix::mount::fsconfig_reconfigure(&fs)?)
}

/// A sysfs mount that is attached to no path: only this descriptor reaches it.
fn private_sysfs() -> io::Result<OwnedFd> {
    let fs = rustix::mount::fsopen("sysfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    rustix::mount::fsconfig_create(&fs)?;
    Ok(rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOEXEC | MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )?)
}
