//! DNS on the agent's tunnel address, over UDP and TCP: queries are
//! forwarded as they are to the pod's nameservers (from its
//! /etc/resolv.conf), over the transport they came on, so cluster names,
//! ExternalName CNAMEs and headless services resolve exactly as they would
//! for the swapped container, and an answer too large for UDP comes back
//! truncated (TC) over UDP and whole over TCP, where the sidecar asks again.
//! A query no nameserver answers in time gets an empty answer for AAAA
//! (clients then use the A answer at once) and SERVFAIL otherwise.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tpd_tunnel::io::{dns_exchange, dns_exchange_tcp, read_dns_tcp, write_dns_tcp};
use tpd_wire::dns;

use super::udp::UdpFlow;

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP connection with no query for this long is closed (RFC 7766 asks
/// servers for seconds; the sidecar sends one query per connection).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The nameservers of a resolv.conf text, in order.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The pod's nameservers, read once when the agent starts.
pub fn system_nameservers() -> Arc<[SocketAddr]> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let found = nameservers(&conf);
    if found.is_empty() {
        tracing::warn!("no nameserver in /etc/resolv.conf: cluster names will not resolve");
    }
    found.into()
}

/// The transport a query came on, and goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Udp,
    Tcp,
}

/// Serves one tunnelled UDP flow to port 53, each datagram one query,
/// answered concurrently (resolvers send A and AAAA at once), until no
/// query came for `idle`.
pub async fn serve(mut flow: UdpFlow, servers: Arc<[SocketAddr]>, idle: Duration) {
    while let Ok(Some(query)) = tokio::time::timeout(idle, flow.recv()).await {
        let (reply, servers) = (flow.reply().clone(), servers.clone());
        tokio::spawn(async move {
            if let Some(answer) = answer(&query, &servers, Over::Udp).await {
                reply.send(&answer);
            }
        });
    }
}

/// Serves one tunnelled TCP connection to port 53: each length-prefixed
/// query is forwarded over TCP and answered in turn, until the peer closes
/// or sends nothing for [`TCP_IDLE`].
pub async fn serve_tcp<C: AsyncRead + AsyncWrite + Unpin>(mut conn: C, servers: Arc<[SocketAddr]>) {
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_dns_tcp(&mut conn)).await {
            Ok(Ok(Some(query))) => query,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(e)) => return tracing::debug!("DNS over TCP: {e}"),
        };
        let Some(answer) = answer(&query, &servers, Over::Tcp).await else {
            return;
        };
        if let Err(e) = write_dns_tcp(&mut conn, &answer).await {
            return tracing::debug!("DNS over TCP: {e}");
        }
    }
}

async fn answer(query: &[u8], servers: &[SocketAddr], over: Over) -> Option<Vec<u8>> {
    let Ok(q) = dns::question(query) else {
        tracing::debug!("dropped a malformed DNS query");
        return None;
    };
    for server in servers {
        let reply = match over {
            Over::Udp => dns_exchange(query, *server, QUERY_TIMEOUT).await,
            Over::Tcp => dns_exchange_tcp(query, *server, QUERY_TIMEOUT).await,
        };
        match reply {
            Ok(reply) => return Some(reply),
            Err(e) => tracing::debug!(%server, ?over, "DNS forward failed: {e}"),
        }
    }
    let rcode = if q.qtype == dns::TYPE_AAAA { 0 } else { dns::RCODE_SERVFAIL };
    dns::empty_response(query, rcode).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_in_order() {
        let conf = "search ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n# c\nnameserver fe80::1%eth0\noptions ndots:5\n";
        assert_eq!(nameservers(conf), vec!["10.96.0.10:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]);
    }

    fn query(id: u16, qtype: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        q.extend_from_slice(b"\x03big\x02ns\x03svc\x07cluster\x05local\x00");
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    /// A nameserver that answers over TCP only, with the query grown to
    /// 2,000 bytes (as a headless service of many pods would be).
    async fn tcp_nameserver() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    while let Ok(Some(mut q)) = read_dns_tcp(&mut sock).await {
                        q[2] |= 0x80;
                        q.resize(2000, 0);
                        write_dns_tcp(&mut sock, &q).await.unwrap();
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_queries_go_to_the_nameserver_over_tcp_in_turn() {
        let servers: Arc<[SocketAddr]> = vec![tcp_nameserver().await].into();
        let (mut sidecar, agent) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve_tcp(agent, servers));
        for id in [1, 2] {
            write_dns_tcp(&mut sidecar, &query(id, 1)).await.unwrap();
            let answer = read_dns_tcp(&mut sidecar).await.unwrap().unwrap();
            assert_eq!((answer.len(), &answer[..2]), (2000, &id.to_be_bytes()[..]));
        }
        drop(sidecar);
        served.await.unwrap();
    }

    #[tokio::test]
    async fn a_tcp_query_nobody_answers_fails_as_over_udp() {
        // Nothing listens on a port just released.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let servers: Arc<[SocketAddr]> = vec![closed].into();
        let (mut sidecar, agent) = tokio::io::duplex(4096);
        tokio::spawn(serve_tcp(agent, servers));
        for (qtype, rcode) in [(dns::TYPE_AAAA, 0), (1, dns::RCODE_SERVFAIL)] {
            write_dns_tcp(&mut sidecar, &query(7, qtype)).await.unwrap();
            let answer = read_dns_tcp(&mut sidecar).await.unwrap().unwrap();
            assert_eq!(answer[3] & 0x0f, rcode);
        }
    }
}
