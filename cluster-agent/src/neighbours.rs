//! The pod's neighbour ports: what the pod's other containers listen on,
//! found in the pod's own socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`,
//! which show the network namespace of whoever reads them, and which any
//! user may read), every [`SCAN_EVERY`]. A port counts when it listens on
//! an address the pod's loopback reaches: 127.0.0.1, ::1, 0.0.0.0 or ::.
//! The agent's own sockets (the transport port, the swapped container's
//! inbound ports, its outbound dials; an intercept agent's ports and the
//! real container's intercepted ones) are left out by their inode and by
//! port. The set goes to the sidecar (`PodPorts`) whenever it changes; the
//! sidecar listens on each port in the developer's namespace and relays to
//! `POD_LOOPBACK_TUNNEL_IP`, which the stack dials with [`dial_loopback`].

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tpd_wire::intercept::Config;
use tpd_wire::names::AGENT_TRANSPORT_PORT;
use tpd_wire::neighbours::{PodPort, Protocol};

/// How often the socket tables are read: a neighbour that starts listening
/// is reachable from the developer's container within about this long.
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The ports the agent itself holds in the pod, never a neighbour's.
#[derive(Debug, Clone, Default)]
pub struct Own {
    ports: HashSet<u16>,
}

impl Own {
    /// The transport port and the swapped container's inbound ports.
    pub fn new(inbound: &[u16]) -> Self {
        Own { ports: inbound.iter().copied().chain([AGENT_TRANSPORT_PORT]).collect() }
    }

    /// An intercept agent's: its transport, intercept and listening ports,
    /// and the real container's intercepted ports, which the app holds and
    /// the developer's container must not shadow on its 127.0.0.1.
    pub fn intercept(config: &Config) -> Self {
        let ports = config.ports.iter().flat_map(|p| [p.remote, p.listen]);
        Own { ports: ports.chain([config.transport, config.intercept]).collect() }
    }

    pub fn holds(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }
}

/// Reads the tables every [`SCAN_EVERY`] and publishes the set when it
/// changes, to every session's control (`Instance`'s forwarder).
pub async fn watch(own: Own, found: watch::Sender<Vec<PodPort>>) {
    let mut last = None;
    loop {
        let ports = scan(&own);
        if last.as_ref() != Some(&ports) {
            tracing::info!(ports = %list(&ports), "ports listening in the pod");
            found.send_replace(ports.iter().copied().collect());
            last = Some(ports);
        }
        tokio::time::sleep(SCAN_EVERY).await;
    }
}

fn list(ports: &BTreeSet<PodPort>) -> String {
    ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The neighbour ports listening now.
fn scan(own: &Own) -> BTreeSet<PodPort> {
    let mine = own_inodes();
    let tables = [
        ("/proc/net/tcp", Protocol::Tcp),
        ("/proc/net/tcp6", Protocol::Tcp),
        ("/proc/net/udp", Protocol::Udp),
        ("/proc/net/udp6", Protocol::Udp),
    ];
    let mut ports = BTreeSet::new();
    for (path, protocol) in tables {
        // A kernel without IPv6 has no tcp6/udp6: nothing listens there.
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        ports.extend(
            listening(&text, protocol)
                .filter(|l| !mine.contains(&l.inode) && !own.holds(l.port))
                .map(|l| PodPort { port: l.port, protocol }),
        );
    }
    ports
}

/// The inodes of the agent's own sockets (`/proc/self/fd/N -> socket:[INODE]`).
fn own_inodes() -> HashSet<u64> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let name = target.to_str()?;
            name.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// One listening socket of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listening {
    port: u16,
    inode: u64,
}

/// TCP: state LISTEN (0A). UDP: unconnected, state CLOSE (07) with no
/// remote address. Both only where the pod's loopback reaches them.
const TCP_LISTEN: &str = "0A";
const UDP_UNCONNECTED: &str = "07";

/// The listening sockets of one table (`/proc/net/tcp` and the like) that
/// 127.0.0.1 or ::1 reach; lines it cannot read are skipped.
fn listening(table: &str, protocol: Protocol) -> impl Iterator<Item = Listening> + '_ {
    let state = match protocol {
        Protocol::Tcp => TCP_LISTEN,
        Protocol::Udp => UDP_UNCONNECTED,
    };
    table.lines().skip(1).filter_map(move |line| {
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, st, inode) = (fields.get(1)?, fields.get(2)?, fields.get(3)?, fields.get(9)?);
        if *st != state {
            return None;
        }
        let (addr, port) = address(local)?;
        let (_, remote_port) = address(remote)?;
        if remote_port != 0 || !reached_from_loopback(addr) {
            return None;
        }
        Some(Listening { port, inode: inode.parse().ok()? })
    })
}

/// `0100007F:18EB`: the address as the kernel prints it (each 32-bit word
/// in the machine's byte order, in hex) and the port.
fn address(field: &str) -> Option<(std::net::IpAddr, u16)> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| addr.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok());
    let ip = match addr.len() {
        8 => Ipv4Addr::from(word(0)?.to_ne_bytes()).into(),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?.to_ne_bytes());
            }
            Ipv6Addr::from(octets).into()
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Whether a connection from the pod's loopback reaches a socket bound to `addr`.
fn reached_from_loopback(addr: std::net::IpAddr) -> bool {
    match addr {
        std::net::IpAddr::V4(a) => a == Ipv4Addr::LOCALHOST || a.is_unspecified(),
        std::net::IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => v4 == Ipv4Addr::LOCALHOST || v4.is_unspecified(),
            None => a == Ipv6Addr::LOCALHOST || a.is_unspecified(),
        },
    }
}

/// Connects to `port` on the pod's loopback: 127.0.0.1, or ::1 where only
/// an IPv6 socket listens. With TCP_NODELAY, as every connection the agent
/// relays: a request written in pieces (HTTP/2's HEADERS then DATA) would
/// otherwise wait for the app's delayed ACK, 40 ms a gRPC call.
pub async fn dial_loopback(port: u16) -> io::Result<TcpStream> {
    let sock = match TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await.map_err(|_| e)
        }
        other => other,
    }?;
    sock.set_nodelay(true)?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Read from /proc/net on a Linux 6.x host with Python listeners on
    // 127.0.0.1:6379, 0.0.0.0:2024, [::]:9090, [::1]:9091,
    // [::ffff:127.0.0.1]:7000 (TCP) and 0.0.0.0:8125, [::1]:5353 (UDP), a
    // UDP socket connected to 8125 and an outbound TCP connection; the
    // listener on 192.0.2.2:2025 is the same line made to listen on a pod
    // IP, which the pod's loopback does not reach.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 49770 1 000000002ad489fd 100 0 0 10 0
   1: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 337 1 0000000062bdefe5 100 0 0 10 0
   2: 020200C0:B518 507100CB:01BB 01 00000000:00000000 00:00000000 00000000     0        0 46188 1 00000000c4fee228 20 4 7 45 -1
   3: 020200C0:07E9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 338 1 0000000062bdefe5 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 49772 1 00000000cefe9083 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:1B58 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 49776 1 000000008b948da1 100 0 0 10 0
   2: 00000000000000000000000001000000:2383 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 49773 1 00000000f9e25c4b 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 6026: 0100007F:8BE5 0100007F:1FBD 01 00000000:00000000 00:00000000 00000000     0        0 49775 2 00000000d99b957a 0
11106: 00000000:1FBD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 49771 2 0000000079ba7be0 0
";
    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 8334: 00000000000000000000000001000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 49774 2 000000001a948df4 0
";

    fn ports(table: &str, protocol: Protocol) -> Vec<(u16, u64)> {
        listening(table, protocol).map(|l| (l.port, l.inode)).collect()
    }

    #[test]
    fn listeners_the_pods_loopback_reaches() {
        // Not the outbound connection, nor the listener on the pod's IP.
        assert_eq!(ports(TCP, Protocol::Tcp), [(6379, 49770), (2024, 337)]);
        // [::]:9090, IPv4-mapped 127.0.0.1:7000 and [::1]:9091.
        assert_eq!(ports(TCP6, Protocol::Tcp), [(9090, 49772), (7000, 49776), (9091, 49773)]);
        // Not the connected client socket.
        assert_eq!(ports(UDP, Protocol::Udp), [(8125, 49771)]);
        assert_eq!(ports(UDP6, Protocol::Udp), [(5353, 49774)]);
    }

    #[test]
    fn a_udp_table_read_as_tcp_finds_nothing() {
        assert!(ports(UDP, Protocol::Tcp).is_empty());
        assert!(ports(TCP, Protocol::Udp).is_empty());
    }

    #[test]
    fn broken_lines_are_skipped() {
        let table = "header\n   0: 0100007F 00000000:0000 0A\n   1: zz:18EB 00000000:0000 0A 0 0 0 0 0 1\n\n";
        assert!(ports(table, Protocol::Tcp).is_empty());
        assert_eq!(address("0100007F:18EB"), Some((Ipv4Addr::LOCALHOST.into(), 6379)));
        assert_eq!(address("0100007F:"), None);
        assert_eq!(address("0100007:18EB"), None);
    }

    #[test]
    fn the_agents_own_ports_are_not_neighbours() {
        let own = Own::new(&[8080]);
        assert!(own.holds(8080) && own.holds(AGENT_TRANSPORT_PORT) && !own.holds(6379));
        let config = Config {
            transport: 7710,
            intercept: 7711,
            ports: vec![tpd_wire::intercept::PortMap { remote: 8080, listen: 18080 }],
        };
        let own = Own::intercept(&config);
        assert!([7710, 7711, 8080, 18080].iter().all(|&p| own.holds(p)), "{own:?}");
        assert!(!own.holds(6379));
    }

    /// In this process's own network namespace: a listener on 127.0.0.1 is
    /// found, unless it is one of the agent's own sockets, which it is here.
    #[test]
    fn a_scan_leaves_out_the_agents_own_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert!(listening(&table, Protocol::Tcp).any(|l| l.port == port), "the table shows the listener");
        assert!(!scan(&Own::default()).contains(&PodPort::tcp(port)), "but it is the agent's own");
    }
}
