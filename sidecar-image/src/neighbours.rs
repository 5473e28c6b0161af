//! The pod's neighbour ports in the developer's network namespace: for each
//! port the pod's other containers serve on its loopback, a listener on
//! `127.0.0.1:<port>` here (the developer's container shares this
//! namespace) whose connections and UDP flows go through the tunnel to
//! `POD_LOOPBACK_TUNNEL_IP:<port>`, which the agent dials as
//! `127.0.0.1:<port>` in the pod. The CLI's ports (declared by the pod's
//! other containers, or `--pod-port`) are bound at start; the ones the
//! agent finds listening come and go with `PodPorts`.
//!
//! A port something here already holds (the developer's app, the sidecar's
//! DNS) stays theirs: the sidecar says so once, as a warning the CLI
//! prints, and carries the others.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tpd_wire::names::POD_LOOPBACK_TUNNEL_IP;
use tpd_wire::neighbours::{Declared, PodPort, Protocol};
use tpd_wire::sidecar::Event;

/// A UDP flow with nothing in either direction for this long is dropped.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// Who the warning names for a port the agent found listening.
const FOUND: &str = "a container of the pod listens on it";

pub struct Neighbours {
    /// The CLI's ports, carried for the whole session.
    declared: Vec<Declared>,
    /// Local ports that are the developer's (`--port REMOTE:LOCAL`): never bound.
    reserved: HashSet<u16>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The relay task of each port carried; aborting it closes the listener.
    held: HashMap<PodPort, JoinHandle<()>>,
    /// Ports already warned about, so that each clash is said once.
    warned: HashSet<PodPort>,
}

impl Neighbours {
    pub fn new(declared: Vec<Declared>, reserved: impl IntoIterator<Item = u16>) -> Arc<Self> {
        Arc::new(Neighbours { declared, reserved: reserved.into_iter().collect(), state: Mutex::default() })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Carries the declared ports plus `found` (the agent's latest set) and
    /// no others. Binding happens here, before this returns, so that what
    /// is announced as ready already listens.
    pub fn apply(&self, found: &[PodPort]) {
        let wanted = wanted(&self.declared, found, &self.reserved);
        let mut state = self.state();
        state.held.retain(|port, task| {
            let keep = wanted.contains_key(port) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, owner) in wanted {
            if state.held.contains_key(&port) {
                continue;
            }
            match bind(port) {
                Ok(task) => {
                    tracing::info!(%port, owner, "pod port carried to 127.0.0.1");
                    state.held.insert(port, task);
                    state.warned.remove(&port);
                }
                Err(e) if state.warned.insert(port) => warn(&clash_message(port, owner, &e)),
                Err(_) => {}
            }
        }
    }
}

/// Each port to carry, with who serves it in the pod: the declared ones,
/// then the ones found, less the developer's.
fn wanted<'a>(declared: &'a [Declared], found: &[PodPort], reserved: &HashSet<u16>) -> BTreeMap<PodPort, &'a str> {
    let found = found.iter().filter(|p| !reserved.contains(&p.port)).map(|&p| (p, FOUND));
    // Declared last, so that their owner's name wins over "found".
    found.chain(declared.iter().map(|d| (d.port, d.owner.as_str()))).collect()
}

/// The one line the developer reads when a pod port stays theirs.
fn clash_message(port: PodPort, owner: &str, e: &std::io::Error) -> String {
    let why = match e.kind() {
        std::io::ErrorKind::AddrInUse => "something in your container (or the sidecar) already listens there".into(),
        _ => e.to_string(),
    };
    let whose = match owner {
        FOUND => "where a container of the pod listens".to_string(),
        owner => format!("of the pod's {owner}"),
    };
    format!("pod port {port} ({whose}) is not reachable on 127.0.0.1:{}: {why}", port.port)
}

/// Logs `message` and prints it as an [`Event::Warning`] line for the CLI.
fn warn(message: &str) {
    tracing::warn!("{message}");
    let line = serde_json::to_string(&Event::Warning { message: message.into() }).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Binds `127.0.0.1:port` now and relays it in a task.
fn bind(port: PodPort) -> std::io::Result<JoinHandle<()>> {
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, port.port));
    let remote = SocketAddr::from((POD_LOOPBACK_TUNNEL_IP, port.port));
    // std's binds, which return once the port is bound (`apply` is
    // synchronous). Its UDP bind sets no SO_REUSEADDR, so a UDP port the
    // developer's app bound (with it) on 0.0.0.0 is refused here rather than
    // shadowed on loopback; TCP listeners on 127.0.0.1 and 0.0.0.0 exclude
    // each other whatever that option says.
    Ok(match port.protocol {
        Protocol::Tcp => {
            let listener = std::net::TcpListener::bind(local)?;
            listener.set_nonblocking(true)?;
            tokio::spawn(relay_tcp(TcpListener::from_std(listener)?, remote))
        }
        Protocol::Udp => {
            let sock = std::net::UdpSocket::bind(local)?;
            sock.set_nonblocking(true)?;
            tokio::spawn(relay_udp(Arc::new(UdpSocket::from_std(sock)?), remote))
        }
    })
}

async fn relay_tcp(listener: TcpListener, remote: SocketAddr) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            // Out of descriptors, most likely: give them time to close.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            match TcpStream::connect(remote).await {
                Ok(mut pod) => {
                    let _ = pod.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut pod).await;
                }
                // The client sees its connection closed, as the pod's port did.
                Err(e) => tracing::debug!(%remote, "pod port: {e}"),
            }
        });
    }
}

/// One flow per local client address: a socket connected to the pod's
/// port through the tunnel, whose answers go back from the listener.
async fn relay_udp(listener: Arc<UdpSocket>, remote: SocketAddr) {
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = listener.recv_from(&mut buf).await else { continue };
        let existing = flows.lock().unwrap_or_else(|p| p.into_inner()).get(&client).cloned();
        let flow = match existing {
            Some(flow) => flow,
            None => match open_flow(&listener, &flows, client, remote).await {
                Ok(flow) => flow,
                Err(e) => {
                    tracing::debug!(%remote, "pod port: {e}");
                    continue;
                }
            },
        };
        let _ = flow.send(&buf[..n]).await;
    }
}

async fn open_flow(
    listener: &Arc<UdpSocket>,
    flows: &Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
    client: SocketAddr,
    remote: SocketAddr,
) -> std::io::Result<Arc<UdpSocket>> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    sock.connect(remote).await?;
    let sock = Arc::new(sock);
    flows.lock().unwrap_or_else(|p| p.into_inner()).insert(client, sock.clone());
    let (listener, flows, up) = (listener.clone(), flows.clone(), sock.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, up.recv(&mut buf)).await {
            let _ = listener.send_to(&buf[..n], client).await;
        }
        flows.lock().unwrap_or_else(|p| p.into_inner()).remove(&client);
    });
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(port: &str, owner: &str) -> Declared {
        Declared { port: port.parse().unwrap(), owner: owner.into() }
    }

    #[test]
    fn declared_ports_keep_their_owner_and_the_developers_stay_theirs() {
        let d = [declared("6379", "container redis"), declared("9000", "--pod-port")];
        let found = [PodPort::tcp(6379), PodPort::udp(8125), PodPort::tcp(3000)];
        let got = wanted(&d, &found, &HashSet::from([3000, 9000]));
        let got: Vec<(String, &str)> = got.into_iter().map(|(p, o)| (p.to_string(), o)).collect();
        // 9000 is asked for by hand, so it is carried even though it is a local port of `--port`.
        assert_eq!(
            got,
            [("6379".into(), "container redis"), ("8125/udp".into(), FOUND), ("9000".into(), "--pod-port")]
        );
    }

    #[test]
    fn a_clash_names_the_port_and_whose_it_is() {
        let in_use = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        assert_eq!(
            clash_message(PodPort::tcp(6379), "container redis", &in_use),
            "pod port 6379 (of the pod's container redis) is not reachable on 127.0.0.1:6379: \
             something in your container (or the sidecar) already listens there"
        );
        assert!(clash_message(PodPort::udp(53), FOUND, &in_use).starts_with("pod port 53/udp (where a container"));
    }

    /// A port held here stays its holder's; the next apply that finds it
    /// free takes it, and a port no longer wanted is let go.
    #[tokio::test]
    async fn a_held_port_stays_its_holders() {
        let theirs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = theirs.local_addr().unwrap().port();
        let n = Neighbours::new(Vec::new(), []);
        n.apply(&[PodPort::tcp(port)]);
        assert!(n.state().held.is_empty() && n.state().warned.contains(&PodPort::tcp(port)));
        drop(theirs);
        n.apply(&[PodPort::tcp(port)]);
        assert!(n.state().held.contains_key(&PodPort::tcp(port)));
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err(), "the sidecar holds it now");
        n.apply(&[]);
        assert!(n.state().held.is_empty());
        // The aborted task drops its listener when the runtime next runs it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "let go");
    }
}
