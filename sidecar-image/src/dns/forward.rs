//! How the sidecar asks a nameserver (the agent through the tunnel, or the
//! host's resolver): over UDP, and again over TCP when the UDP answer came
//! truncated, so the cache always holds whole answers.
//!
//! Queries to the agent reuse a few connected sockets: inside the tunnel
//! nobody can forge an answer, so a fresh port per query defends against
//! nothing there, and it cost the sidecar six system calls a query and the
//! agent a new flow (a task and a queue) for each. Queries to the host's
//! resolver keep a fresh port each (RFC 5452).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hickory_server::proto::op::Message;
use tokio::net::UdpSocket;
use tpd_tunnel::io::{dns_exchange, dns_exchange_on, dns_exchange_tcp, dns_socket};

/// One query's wait for each transport.
const QUERY_TIMEOUT: Duration = Duration::from_secs(4);

/// Sends a query to a nameserver and returns its whole answer.
pub trait Forward: Send + Sync + Unpin + 'static {
    fn exchange(&self, query: &Message, server: SocketAddr) -> impl Future<Output = io::Result<Message>> + Send;
}

/// Idle sockets kept for queries to the agent.
const POOL: usize = 8;

/// Over the network: UDP, then TCP on truncation. Queries to the agent's
/// tunnel address are routed into the tunnel like any other traffic.
pub struct Network {
    /// The agent's DNS address, which [`Network::pool`] is for.
    agent: SocketAddr,
    /// Connected sockets to the agent not in use.
    pool: Mutex<Vec<UdpSocket>>,
}

impl Network {
    pub fn new(agent: SocketAddr) -> Self {
        Network { agent, pool: Mutex::default() }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<UdpSocket>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One UDP exchange with the agent on a pooled socket. A socket whose
    /// exchange failed is dropped, so no late answer meets a later query.
    async fn with_agent(&self, query: &[u8]) -> io::Result<Vec<u8>> {
        let idle = self.pool().pop();
        let sock = match idle {
            Some(sock) => sock,
            None => dns_socket(self.agent).await?,
        };
        let answer = dns_exchange_on(&sock, query, QUERY_TIMEOUT).await?;
        let mut pool = self.pool();
        if pool.len() < POOL {
            pool.push(sock);
        }
        Ok(answer)
    }
}

impl Forward for Network {
    async fn exchange(&self, query: &Message, server: SocketAddr) -> io::Result<Message> {
        let bytes = query.to_vec().map_err(io::Error::other)?;
        let answer = match server == self.agent {
            true => self.with_agent(&bytes).await?,
            false => dns_exchange(&bytes, server, QUERY_TIMEOUT).await?,
        };
        // TC read from the header: a cut answer need not parse.
        if answer.get(2).is_some_and(|flags| flags & 0x02 == 0) {
            return decode(&answer);
        }
        tracing::debug!(%server, "truncated over UDP; asking again over TCP");
        decode(&dns_exchange_tcp(&bytes, server, QUERY_TIMEOUT).await?)
    }
}

fn decode(answer: &[u8]) -> io::Result<Message> {
    Message::from_vec(answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    use hickory_server::proto::op::{Query, ResponseCode};
    use hickory_server::proto::rr::rdata::A;
    use hickory_server::proto::rr::{Name, RData, Record, RecordType};
    use tokio::net::{TcpListener, UdpSocket};
    use tpd_tunnel::io::{read_dns_tcp, write_dns_tcp};

    use super::*;

    /// A nameserver whose UDP answers are cut (TC, no records) and whose
    /// TCP answers hold `records` A records; returns its address (one port
    /// for both).
    async fn truncating_nameserver(records: u8) -> SocketAddr {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = UdpSocket::bind(addr).await.unwrap();
        let answer = move |query: &[u8], cut: bool| {
            let q = Message::from_vec(query).unwrap();
            let mut a = Message::response(q.metadata.id, q.metadata.op_code);
            a.queries = q.queries.clone();
            a.metadata.truncation = cut;
            if !cut {
                let name = q.queries[0].name().clone();
                a.answers = (1..=records)
                    .map(|i| Record::from_rdata(name.clone(), 5, RData::A(A(Ipv4Addr::new(10, 1, 0, i)))))
                    .collect();
            }
            a.to_vec().unwrap()
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&answer(&buf[..n], true), from).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = tcp.accept().await {
                while let Ok(Some(q)) = read_dns_tcp(&mut sock).await {
                    write_dns_tcp(&mut sock, &answer(&q, false)).await.unwrap();
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_truncated_udp_answer_is_asked_again_over_tcp() {
        let server = truncating_nameserver(40).await;
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_str("big.ns.svc.cluster.local.").unwrap(), RecordType::A));
        // As the host's resolver, on a fresh port, and as the agent, pooled.
        for network in [Network::new("192.0.2.1:53".parse().unwrap()), Network::new(server)] {
            let answer = network.exchange(&query, server).await.unwrap();
            assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
            assert!(!answer.metadata.truncation);
            assert_eq!(answer.answers.len(), 40);
        }
    }

    /// A nameserver that echoes each query as its answer and reports the
    /// port each came from.
    async fn echo_nameserver() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<u16>) {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let mut a = Message::from_vec(&buf[..n]).unwrap();
                a.metadata.message_type = hickory_server::proto::op::MessageType::Response;
                let _ = tx.send(from.port());
                let _ = udp.send_to(&a.to_vec().unwrap(), from).await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn the_agent_is_asked_from_pooled_sockets_and_the_rest_from_fresh_ones() {
        let (server, mut ports) = echo_nameserver().await;
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_str("a.cluster.local.").unwrap(), RecordType::A));
        let mut seen = || (0..3).map(|_| ports.try_recv().unwrap()).collect::<Vec<u16>>();
        let agent = Network::new(server);
        for _ in 0..3 {
            agent.exchange(&query, server).await.unwrap();
        }
        let pooled = seen();
        assert!(pooled.iter().all(|p| *p == pooled[0]), "one socket, reused: {pooled:?}");
        let upstream = Network::new("192.0.2.1:53".parse().unwrap());
        for _ in 0..3 {
            upstream.exchange(&query, server).await.unwrap();
        }
        let fresh = seen();
        assert!(fresh[0] != fresh[1] || fresh[1] != fresh[2], "a port per query: {fresh:?}");
    }
}
