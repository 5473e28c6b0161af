//! A TUN device, created as the sidecar creates its own
//! (`sidecar-image/src/tun.rs`): `/dev/net/tun` and `TUNSETIFF` with
//! `IFF_TUN | IFF_NO_PI`, so each read and write is one bare IP packet. The
//! device lives in the network namespace of the thread that opens it and
//! goes away when its descriptor is closed. Addresses, MTU and routes are
//! set with `ip` afterwards (see `Link::up`).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Creates TUN device `name` in the calling thread's network namespace.
/// The descriptor is non-blocking.
pub fn create(name: &str) -> io::Result<OwnedFd> {
    let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open("/dev/net/tun")?;
    let fd = OwnedFd::from(file);
    // SAFETY: ifreq is plain old data, valid when zeroed.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?} is too long")));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
