//! Userspace TCP and UDP proxies: one listener per service port, choosing a
//! backend per connection (TCP) or per client flow (UDP) from the current
//! endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A UDP flow with no traffic for this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(60);

/// Where a listener's traffic goes; looked up for every new connection so
/// endpoint changes apply at once.
pub trait Backends: Send + Sync + 'static {
    fn backends(&self) -> Vec<SocketAddr>;
}

/// Round-robin over the backends of the moment.
struct Picker<B> {
    backends: B,
    next: AtomicUsize,
}

impl<B: Backends> Picker<B> {
    fn candidates(&self) -> Vec<SocketAddr> {
        let mut all = self.backends.backends();
        if !all.is_empty() {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % all.len();
            all.rotate_left(start);
        }
        all
    }
}

pub async fn serve_tcp<B: Backends>(listener: TcpListener, backends: B, stop: CancellationToken) {
    let picker = Arc::new(Picker { backends, next: AtomicUsize::new(0) });
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut client, _)) = accepted else {
            continue;
        };
        let picker = picker.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            for backend in picker.candidates() {
                if let Ok(Ok(mut upstream)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                    return;
                }
            }
            // No endpoint: the connection is refused, as with kube-proxy.
        });
    }
}

pub async fn serve_udp<B: Backends>(socket: UdpSocket, backends: B, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let picker = Picker { backends, next: AtomicUsize::new(0) };
    let mut flows: HashMap<SocketAddr, (Arc<UdpSocket>, Instant, CancellationToken)> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => break,
            r = socket.recv_from(&mut buf) => r,
        };
        let Ok((n, client)) = received else { continue };
        let now = Instant::now();
        flows.retain(|_, (_, seen, token)| {
            let live = now.duration_since(*seen) < UDP_IDLE;
            if !live {
                token.cancel();
            }
            live
        });
        if let std::collections::hash_map::Entry::Vacant(slot) = flows.entry(client) {
            let Some(backend) = picker.candidates().into_iter().next() else {
                continue;
            };
            let Ok(upstream) = UdpSocket::bind("0.0.0.0:0").await else {
                continue;
            };
            if upstream.connect(backend).await.is_err() {
                continue;
            }
            let upstream = Arc::new(upstream);
            let token = stop.child_token();
            tokio::spawn(relay_replies(upstream.clone(), socket.clone(), client, token.clone()));
            slot.insert((upstream, now, token));
        }
        if let Some((upstream, seen, _)) = flows.get_mut(&client) {
            *seen = now;
            let _ = upstream.send(&buf[..n]).await;
        }
    }
    for (_, (_, _, token)) in flows {
        token.cancel();
    }
}

/// Sends a backend's datagrams back to the client from the service address.
async fn relay_replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let r = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(UDP_IDLE, upstream.recv(&mut buf)) => r,
        };
        match r {
            Ok(Ok(n)) => {
                let _ = listener.send_to(&buf[..n], client).await;
            }
            Ok(Err(_)) => continue,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed(Vec<SocketAddr>);
    impl Backends for Fixed {
        fn backends(&self) -> Vec<SocketAddr> {
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn tcp_and_udp_reach_a_backend_on_loopback() {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.expect("read");
            s.write_all(&b).await.expect("write");
        });
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front_addr = front.local_addr().expect("addr");
        let stop = CancellationToken::new();
        tokio::spawn(serve_tcp(front, Fixed(vec![echo_addr]), stop.clone()));
        let mut c = TcpStream::connect(front_addr).await.expect("connect");
        c.write_all(b"hello").await.expect("write");
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.expect("read");
        assert_eq!(&b, b"hello");

        let udp_echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let udp_echo_addr = udp_echo.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut b = [0u8; 64];
            let (n, from) = udp_echo.recv_from(&mut b).await.expect("recv");
            udp_echo.send_to(&b[..n], from).await.expect("send");
        });
        let udp_front = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let udp_front_addr = udp_front.local_addr().expect("addr");
        tokio::spawn(serve_udp(udp_front, Fixed(vec![udp_echo_addr]), stop.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.send_to(b"ping", udp_front_addr).await.expect("send");
        let mut b = [0u8; 64];
        let (n, from) =
            tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut b)).await.expect("reply").expect("recv");
        assert_eq!((&b[..n], from), (&b"ping"[..], udp_front_addr));
        stop.cancel();
    }
}
