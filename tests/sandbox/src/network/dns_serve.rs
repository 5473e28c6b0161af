//! The cluster DNS server's sockets: UDP and TCP on port 53 of the DNS
//! service's address, as CoreDNS serves both. Over UDP an answer is cut to
//! what the client takes and marked truncated ([`dns::encode`]), so a
//! resolver retries over TCP, where each message has a 2-byte length prefix
//! (RFC 1035 4.2.2) and a connection carries many (RFC 7766).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::Message;
use k8s_openapi::api::core::v1::Endpoints;
use kube::runtime::reflector::ObjectRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::{Cluster, dns};

/// How long a TCP connection may wait for its next query (CoreDNS's read
/// timeout), so idle clients do not hold connections for ever.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// How a query arrived, which bounds the size of its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

#[derive(Clone)]
pub(super) struct Server {
    pub cluster: Cluster,
    /// The host's resolver, for names outside the cluster.
    pub upstream: Option<IpAddr>,
}

impl Server {
    /// The reply bytes for one query, answered or forwarded.
    async fn respond(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let msg = Message::from_vec(query).ok()?;
        match dns::answer(&msg, &zone(&self.cluster)) {
            dns::Reply::Answer(m) => {
                let limit = match transport {
                    Transport::Udp => dns::udp_limit(&msg),
                    Transport::Tcp => u16::MAX,
                };
                dns::encode(&m, limit)
            }
            // The upstream sized its answer for the query, which goes as it came.
            dns::Reply::Forward => forward(query, self.upstream?).await,
        }
    }

    pub async fn serve_udp(self, sock: UdpSocket, shutdown: CancellationToken) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 4096];
        loop {
            let r = tokio::select! {
                () = shutdown.cancelled() => return,
                r = sock.recv_from(&mut buf) => r,
            };
            let Ok((n, from)) = r else { continue };
            let query = buf[..n].to_vec();
            let (sock, server) = (sock.clone(), self.clone());
            tokio::spawn(async move {
                if let Some(reply) = server.respond(&query, Transport::Udp).await {
                    let _ = sock.send_to(&reply, from).await;
                }
            });
        }
    }

    pub async fn serve_tcp(self, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let r = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.accept() => r,
            };
            let Ok((conn, _)) = r else { continue };
            let server = self.clone();
            tokio::spawn(async move {
                serve_stream(conn, |q| {
                    let server = server.clone();
                    async move { server.respond(&q, Transport::Tcp).await }
                })
                .await;
            });
        }
    }
}

/// Answers the length-prefixed queries of one stream in order until the
/// client closes it, stays idle for [`TCP_IDLE`], or a query gets no answer.
async fn serve_stream<S, F, R>(mut conn: S, answer: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Vec<u8>) -> R,
    R: Future<Output = Option<Vec<u8>>>,
{
    loop {
        let Ok(Ok(len)) = tokio::time::timeout(TCP_IDLE, conn.read_u16()).await else {
            return;
        };
        let mut query = vec![0u8; usize::from(len)];
        if conn.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = answer(query).await else {
            return;
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if conn.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// The DNS view of the cluster right now.
fn zone(cluster: &Cluster) -> dns::Zone {
    let mut z = dns::Zone::default();
    for svc in cluster.services.state() {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let spec = svc.spec.clone().unwrap_or_default();
        let key = ObjectRef::<Endpoints>::new(&name).within(&ns);
        let endpoints = cluster
            .endpoints
            .get(&key)
            .map(|e| {
                e.subsets
                    .iter()
                    .flatten()
                    .flat_map(|s| s.addresses.iter().flatten())
                    .filter_map(|a| a.ip.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let record = dns::ServiceRecord {
            cluster_ip: spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()),
            endpoints,
            external_name: spec.external_name.clone().filter(|_| spec.type_.as_deref() == Some("ExternalName")),
            ports: spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone()?,
                        p.protocol.clone().unwrap_or_else(|| "TCP".into()).to_lowercase(),
                        u16::try_from(p.port).ok()?,
                    ))
                })
                .collect(),
        };
        z.services.insert((ns, name), record);
    }
    z
}

async fn forward(query: &[u8], upstream: IpAddr) -> Option<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().ok()?;
    let sock = UdpSocket::bind(bind).await.ok()?;
    sock.connect((upstream, 53)).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two queries pipelined in one connection, the second split across
    /// writes, are answered in order, each with its length prefix; a reply
    /// larger than any UDP limit goes whole.
    #[tokio::test]
    async fn tcp_messages_are_length_prefixed_and_pipelined() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve_stream(server, |q: Vec<u8>| async move {
            // Echo the query, padded to 700 bytes.
            let mut r = q.clone();
            r.resize(700, 0xab);
            Some(r)
        }));
        let mut first = vec![0u8, 3];
        first.extend_from_slice(b"one");
        first.extend_from_slice(&[0, 3, b't']);
        client.write_all(&first).await.expect("write");
        client.flush().await.expect("flush");
        tokio::task::yield_now().await;
        client.write_all(b"wo").await.expect("write");
        for want in [&b"one"[..], b"two"] {
            let len = client.read_u16().await.expect("length");
            let mut reply = vec![0u8; usize::from(len)];
            client.read_exact(&mut reply).await.expect("reply");
            assert_eq!((len, &reply[..3]), (700, want));
        }
        drop(client);
        served.await.expect("the server ends when the client closes");
    }

    /// A query with no answer (undecodable) closes the connection rather
    /// than leaving the client waiting.
    #[tokio::test]
    async fn an_unanswered_query_closes_the_connection() {
        let (mut client, server) = tokio::io::duplex(1024);
        let served = tokio::spawn(serve_stream(server, |_q: Vec<u8>| async { None }));
        client.write_all(&[0, 1, 0xff]).await.expect("write");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty());
        served.await.expect("ended");
    }
}
