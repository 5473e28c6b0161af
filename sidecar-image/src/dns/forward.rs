//! How the sidecar asks a nameserver (the agent through the tunnel, or the
//! host's resolver): over UDP, and again over TCP when the UDP answer came
//! truncated, so the cache always holds whole answers.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_server::proto::op::Message;
use tpd_tunnel::io::{dns_exchange, dns_exchange_tcp};

/// One query's wait for each transport.
const QUERY_TIMEOUT: Duration = Duration::from_secs(4);

/// Sends a query to a nameserver and returns its whole answer.
pub trait Forward: Send + Sync + Unpin + 'static {
    fn exchange(&self, query: &Message, server: SocketAddr) -> impl Future<Output = io::Result<Message>> + Send;
}

/// Over the network: UDP, then TCP on truncation. Queries to the agent's
/// tunnel address are routed into the tunnel like any other traffic.
pub struct Network;

impl Forward for Network {
    async fn exchange(&self, query: &Message, server: SocketAddr) -> io::Result<Message> {
        let bytes = query.to_vec().map_err(io::Error::other)?;
        let answer = dns_exchange(&bytes, server, QUERY_TIMEOUT).await?;
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
        let answer = Network.exchange(&query, server).await.unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(!answer.metadata.truncation);
        assert_eq!(answer.answers.len(), 40);
    }
}
