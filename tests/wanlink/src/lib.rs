//! `tpd-wanlink`: an emulated WAN link for the benchmarks (issue #22), in
//! userspace because the kernels of the build machines have no `netem` or
//! `tbf` qdisc.
//!
//! [`Link::up`] makes two fresh network namespaces, the laptop side and the
//! cluster side, each with a TUN device [`DEVICE`] (MTU 1500) on a /30
//! ([`Side::addr`]: 10.79.0.1 and 10.79.0.2), and a relay thread (real-time
//! priority, see `relay.rs`) that moves every IP packet from one device to
//! the other: `rtt / 2` late in each direction, lost at random with
//! probability `loss` (each packet and each direction drawn on its own),
//! and, with a rate, through a bottleneck of that rate whose queue holds
//! the bandwidth-delay product plus 64 KiB and drops the tail (see
//! [`shaper`]). TCP and UDP so meet real per-packet
//! latency, loss and a bottleneck. Callers run programs on either side
//! ([`Link::command`], `ip netns exec`), open sockets there
//! ([`Link::enter`]), route more networks through the link
//! ([`Link::add_route`]), and read what the relay did ([`Link::counters`]).
//! [`Link::echo`] measures the link as a user would: UDP round trips from
//! the laptop side to the cluster side.
//!
//! Dropping the [`Link`] (also while a panic unwinds) stops the relay,
//! which closes the devices, and deletes both namespaces; namespaces that a
//! killed process left behind are deleted by the next [`Link::up`]. Needs
//! root (CAP_NET_ADMIN, CAP_SYS_ADMIN; CAP_SYS_NICE for the priority),
//! `/dev/net/tun` and iproute2.
//!
//! [`TcpDelay`] is the link's little sibling for one TCP server that stays
//! where it is (the sandbox's API server): a loopback relay, no root, that
//! delays every chunk by `rtt / 2` each way and notes the HTTP requests it
//! relays.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

mod echo;
mod netns;
mod relay;
pub mod shaper;
mod tcpdelay;
mod tun;

pub use echo::Echo;
pub use relay::LATE;
pub use tcpdelay::{Request, TcpDelay};

/// The TUN device on each side.
pub const DEVICE: &str = "wan0";
/// The prefix length of the link's network.
pub const PREFIX_LEN: u8 = 30;
/// The MTU of both devices.
pub const MTU: u32 = 1500;
/// Names of the namespaces: `tpdwan-<pid>-<n>-laptop` and `…-cluster`.
const NETNS_PREFIX: &str = "tpdwan-";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed (the link needs root and iproute2): {stderr}")]
    Command { command: String, stderr: String },
    #[error("invalid link: {0}")]
    Spec(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the link does to every packet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// Round-trip time: each direction delays every packet by half of it.
    pub rtt: Duration,
    /// Probability that a packet is lost, per packet and per direction
    /// (a round trip survives with probability `(1 - loss)²`).
    pub loss: f64,
    /// Rate of each direction in Mbit/s of IP packets (headers included),
    /// or no limit but the relay's own speed.
    pub rate_mbit: Option<f64>,
}

impl Spec {
    /// The probability that a round trip fails: the request or its answer is lost.
    pub fn round_trip_loss(&self) -> f64 {
        1.0 - (1.0 - self.loss).powi(2)
    }

    fn check(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.loss) {
            return Err(Error::Spec(format!("loss {} is not a fraction in [0, 1)", self.loss)));
        }
        if let Some(rate) = self.rate_mbit
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(Error::Spec(format!("rate {rate} Mbit/s is not a positive number")));
        }
        Ok(())
    }
}

impl fmt::Display for Spec {
    /// `20 ms`, `50 ms, 0.5% loss`, `80 ms, 100 Mbit/s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms", self.rtt.as_secs_f64() * 1e3)?;
        if self.loss > 0.0 {
            write!(f, ", {}% loss", self.loss * 100.0)?;
        }
        if let Some(rate) = self.rate_mbit {
            write!(f, ", {rate} Mbit/s")?;
        }
        Ok(())
    }
}

/// One end of the link. The link is symmetric; the names are the roles
/// the benchmarks give the two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Laptop,
    Cluster,
}

impl Side {
    /// The side's address on the link's /30.
    pub fn addr(self) -> Ipv4Addr {
        match self {
            Side::Laptop => Ipv4Addr::new(10, 79, 0, 1),
            Side::Cluster => Ipv4Addr::new(10, 79, 0, 2),
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Laptop => 0,
            Side::Cluster => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Side::Laptop => "laptop",
            Side::Cluster => "cluster",
        }
    }
}

/// What the relay did to the packets of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Packets handed to the far side.
    pub forwarded: u64,
    /// Their bytes (IP packets).
    pub bytes: u64,
    /// Packets lost at random.
    pub lost: u64,
    /// Packets dropped at the tail of a full queue.
    pub queue_drops: u64,
    /// Packets the far device refused.
    pub failed_writes: u64,
    /// Packets handed over more than [`LATE`] after their time.
    pub late: u64,
    /// The latest a packet was handed over, after its time.
    pub max_late: Duration,
}

/// What the relay did, both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub laptop_to_cluster: DirCounters,
    pub cluster_to_laptop: DirCounters,
}

/// An emulated link between two fresh network namespaces; see the crate's doc.
pub struct Link {
    spec: Spec,
    /// Namespaces by [`Side::index`]; those created so far.
    netns: Vec<String>,
    shared: Arc<relay::Shared>,
    /// Dropping it stops the relay.
    stop: Option<io::PipeWriter>,
    relay: Option<JoinHandle<()>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link").field("spec", &self.spec).field("netns", &self.netns).finish_non_exhaustive()
    }
}

impl Link {
    /// Builds the link; see the crate's doc.
    pub fn up(spec: Spec) -> Result<Link> {
        static LINKS: AtomicU32 = AtomicU32::new(0);
        spec.check()?;
        netns::delete_stale(NETNS_PREFIX);
        let id = format!("{NETNS_PREFIX}{}-{}", std::process::id(), LINKS.fetch_add(1, Ordering::Relaxed));
        // Filled as it goes: an error drops it, which removes what was made.
        let mut link = Link { spec, netns: Vec::new(), shared: Arc::default(), stop: None, relay: None };
        let mut tuns = Vec::new();
        for side in [Side::Laptop, Side::Cluster] {
            let name = format!("{id}-{}", side.name());
            netns::add(&name)?;
            link.netns.push(name.clone());
            let tun = netns::enter(&name, || {
                // No IPv6 on the link: its devices would send router
                // solicitations and MLD reports into the figures.
                for conf in ["all", "default"] {
                    std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
                }
                tun::create(DEVICE)
            })?
            .map_err(|source| Error::Io { what: format!("creating TUN device {DEVICE} in {name}"), source })?;
            tuns.push(tun);
            let addr = format!("{}/{PREFIX_LEN}", side.addr());
            netns::ip(&["-n", &name, "link", "set", "lo", "up"])?;
            netns::ip(&["-n", &name, "addr", "add", &addr, "dev", DEVICE])?;
            netns::ip(&["-n", &name, "link", "set", DEVICE, "mtu", &MTU.to_string(), "up"])?;
        }
        let tuns: [_; 2] = tuns.try_into().map_err(|_| Error::Spec("two devices expected".into()))?;
        let (reader, writer) = io::pipe().map_err(|source| Error::Io { what: "making a pipe".into(), source })?;
        link.stop = Some(writer);
        link.relay = Some(
            relay::spawn(tuns, spec, link.shared.clone(), reader)
                .map_err(|source| Error::Io { what: "starting the relay thread".into(), source })?,
        );
        Ok(link)
    }

    pub fn spec(&self) -> Spec {
        self.spec
    }

    /// The name of a side's network namespace, for `ip netns exec` and `ip -n`.
    pub fn netns(&self, side: Side) -> &str {
        &self.netns[side.index()]
    }

    /// `ip netns exec <side's namespace> PROGRAM`: add the arguments and run.
    pub fn command(&self, side: Side, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.netns(side), program]);
        cmd
    }

    /// Runs `f` in a side's namespace (on a thread of its own) and returns
    /// its result: sockets it opens stay in that namespace.
    pub fn enter<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> Result<T> {
        netns::enter(self.netns(side), f)
    }

    /// Routes `cidr` (e.g. `10.96.0.0/12`) on `side` into the link, so that
    /// the other side receives it.
    pub fn add_route(&self, side: Side, cidr: &str) -> Result<()> {
        netns::ip(&["-n", self.netns(side), "route", "add", cidr, "dev", DEVICE])
    }

    /// What the relay has done so far.
    pub fn counters(&self) -> Counters {
        let [to_cluster, to_laptop] = &self.shared.dirs;
        Counters { laptop_to_cluster: to_cluster.snapshot(), cluster_to_laptop: to_laptop.snapshot() }
    }

    /// The CPU time the relay thread has used so far (its packets' trips
    /// through the kernels of both namespaces included: a TUN write
    /// delivers the packet to the far stack on the writer's CPU time).
    pub fn relay_cpu(&self) -> Option<Duration> {
        let tid = self.shared.tid.load(Ordering::Relaxed);
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        stat.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
    }

    /// Sends `count` UDP requests from the laptop side to an echo on the
    /// cluster side, one every `interval`, and times the answers; see [`Echo`].
    pub fn echo(&self, count: u32, interval: Duration) -> Result<Echo> {
        let bind = |side: Side| move || UdpSocket::bind(SocketAddr::from((side.addr(), 0)));
        let io = |what: &str| {
            let what = what.to_string();
            move |source| Error::Io { what, source }
        };
        let server = self.enter(Side::Cluster, bind(Side::Cluster))?.map_err(io("binding the echo server"))?;
        let client = self.enter(Side::Laptop, bind(Side::Laptop))?.map_err(io("binding the echo client"))?;
        echo::run(server, client, count, interval, self.spec.rtt).map_err(io("echo over the link"))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // End of file on the relay's pipe stops it; it closes the devices.
        self.stop.take();
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
        for name in &self.netns {
            if let Err(e) = netns::delete(name) {
                eprintln!("wanlink: {e}");
            }
        }
    }
}
