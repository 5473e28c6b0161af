//! The TUN device: created and configured with the classic ioctls (no
//! netlink dependency): address, netmask, MTU, up, and one route per CIDR.
//! Needs NET_ADMIN and /dev/net/tun, the sidecar's only privileges.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

use tpd_wire::sidecar::Cidr;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
pub const NAME: &str = "tpd0";

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new() -> Self {
        let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: [0; 24] };
        r.name[..NAME.len()].copy_from_slice(NAME.as_bytes());
        r
    }
    fn with_addr(addr: Ipv4Addr) -> Self {
        let mut r = IfReq::new();
        r.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        r.data[4..8].copy_from_slice(&addr.octets());
        r
    }
}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: `arg` is a live, correctly laid out argument for `req`.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) }, what)
}

fn inet_sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The largest packet the device hands over (its MTU is at most this).
pub const MAX_PACKET: usize = 65_536;

pub struct Tun {
    fd: AsyncFd<OwnedFd>,
}

impl Tun {
    /// Creates `tpd0` with `addr/prefix` and `mtu`, brings it up and routes `cidrs` into it.
    pub fn create(addr: Ipv4Addr, prefix: u8, mtu: u16, cidrs: &[Cidr]) -> io::Result<Tun> {
        let path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        // SAFETY: plain open(2) of a NUL-terminated path.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        check(raw, "opening /dev/net/tun (does the container have --device /dev/net/tun?)")?;
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new();
        req.data[..2].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        ioctl(&fd, TUNSETIFF, &mut req, "creating the TUN device (needs NET_ADMIN)")?;

        let sock = ioctl_socket()?;
        ioctl(&sock, libc::SIOCSIFADDR, &mut IfReq::with_addr(addr), "setting the tunnel address")?;
        ioctl(&sock, libc::SIOCSIFNETMASK, &mut IfReq::with_addr(Cidr::mask(prefix)), "setting the tunnel netmask")?;
        set_mtu(&sock, mtu)?;
        let mut req = IfReq::new();
        ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "reading the tunnel flags")?;
        let flags = i16::from_ne_bytes([req.data[0], req.data[1]]) | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        req.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "bringing the tunnel up")?;
        for cidr in cidrs {
            add_route(&sock, cidr)?;
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, which deregisters it before closing.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Tun { fd })
    }

    /// Changes the MTU; connections opened from then on take their segment
    /// size from it.
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        set_mtu(&ioctl_socket()?, mtu)
    }

    /// Reads the packets waiting, at least one, into `arena`, and pushes
    /// each one's range onto `packets`: up to `max` of them, while `arena`
    /// has room for one more of the largest size. A burst then crosses the
    /// tunnel together (one GSO send over UDP).
    pub async fn read_batch(&self, arena: &mut [u8], packets: &mut Vec<Range<usize>>, max: usize) -> io::Result<()> {
        let mut used = 0;
        let mut guard = self.fd.readable().await?;
        while packets.len() < max && arena.len() - used >= MAX_PACKET {
            let free = &mut arena[used..];
            // SAFETY: reading into a valid, writable buffer of free.len() bytes.
            let read = guard.try_io(|fd| {
                let n = unsafe { libc::read(fd.as_raw_fd(), free.as_mut_ptr().cast(), free.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match read {
                Ok(n) => {
                    let n = n?;
                    packets.push(used..used + n);
                    used += n;
                }
                Err(_would_block) if packets.is_empty() => guard = self.fd.readable().await?,
                Err(_would_block) => break,
            }
        }
        Ok(())
    }

    /// Writes one IP packet; a full queue drops it, as a NIC would.
    pub fn write(&self, packet: &[u8]) {
        // SAFETY: writing from a valid buffer of packet.len() bytes.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    }
}

/// A socket for interface ioctls.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(sock, "socket for interface setup")?;
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(sock) })
}

fn set_mtu(sock: &OwnedFd, mtu: u16) -> io::Result<()> {
    let mut req = IfReq::new();
    req.data[..4].copy_from_slice(&i32::from(mtu).to_ne_bytes());
    ioctl(sock, libc::SIOCSIFMTU, &mut req, "setting the tunnel MTU")
}

fn add_route(sock: &OwnedFd, cidr: &Cidr) -> io::Result<()> {
    let dev = CString::new(NAME).map_err(io::Error::other)?;
    // SAFETY: rtentry is plain data; zeroed is its documented starting state.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = inet_sockaddr(cidr.network());
    rt.rt_genmask = inet_sockaddr(Cidr::mask(cidr.prefix));
    rt.rt_flags = libc::RTF_UP;
    rt.rt_dev = dev.as_ptr().cast_mut();
    // SAFETY: rt and the device name it points to outlive the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &mut rt as *mut libc::rtentry) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::new(e.kind(), format!("routing {cidr} into the tunnel: {e}")));
        }
    }
    Ok(())
}
