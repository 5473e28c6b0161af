//! The DNS server the developer's container uses (127.0.0.1:53 in the shared
//! network namespace, UDP and TCP), served with hickory-server. Names under
//! the cluster domain (or all names, with the configuration's
//! `dns.all_to_cluster`) go through the tunnel to the agent, which resolves
//! them as the swapped pod would; others go to the upstream resolver the
//! CLI passes (the host's), and are refused without one. Answers are cached
//! ([`cache`]): positive ones for their TTL, negative ones for their SOA
//! minimum. A question is forwarded with the asking client's EDNS size,
//! over UDP and, when that answer comes truncated, again over TCP
//! ([`forward`]), so the cache holds whole answers; hickory cuts each
//! answer to what the client takes over UDP (its EDNS size, else 512
//! bytes, with TC set) and sends it whole over TCP.

mod cache;
mod forward;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_server::proto::rr::{LowerName, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::net::{TcpListener, UdpSocket};
use tokio::time::Instant;
use tpd_wire::dns;
use tpd_wire::names::{AGENT_DNS_PORT, AGENT_TUNNEL_IP};
use tpd_wire::sidecar::Dns;

use self::cache::{Cache, Key};
use self::forward::{Forward, Network};

/// A TCP client that sends no query for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Answers queued per TCP connection.
const TCP_RESPONSE_QUEUE: usize = 32;
/// The largest EDNS size a forwarded query offers (what `dns_exchange` reads).
const MAX_UDP_SIZE: u16 = 4096;

/// Serves DNS on `udp` and `tcp` until one of them fails.
pub async fn serve(udp: UdpSocket, tcp: TcpListener, routing: Dns) {
    let forward = Network::new(SocketAddr::from((AGENT_TUNNEL_IP, AGENT_DNS_PORT)));
    let mut server = Server::new(Resolver::new(routing, forward));
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_QUEUE);
    if let Err(e) = server.block_until_done().await {
        tracing::error!("the DNS server stopped: {e}");
    }
}

/// Where a query for `name` (lower case, no trailing dot) goes; `None`
/// means refuse it.
fn server_for(routing: &Dns, name: &str) -> Option<SocketAddr> {
    if routing.all_to_cluster || dns::is_under(name, &routing.cluster_domain) {
        Some(SocketAddr::from((AGENT_TUNNEL_IP, AGENT_DNS_PORT)))
    } else {
        routing.upstream
    }
}

/// Answers questions from the cache or from the nameserver their name
/// routes to.
pub struct Resolver<F> {
    routing: Dns,
    cache: Mutex<Cache>,
    forward: F,
}

impl<F: Forward> Resolver<F> {
    pub fn new(routing: Dns, forward: F) -> Self {
        Resolver { routing, cache: Mutex::default(), forward }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to `query` (its rcode and record sections). `udp_size`
    /// is the client's EDNS size, which the forwarded query offers too.
    /// A question nobody answered gets an empty NOERROR for AAAA (clients
    /// then use the A answer at once) and SERVFAIL otherwise.
    pub async fn resolve(&self, query: &Query, udp_size: Option<u16>) -> Message {
        let name = LowerName::from(query.name());
        let text = name.to_string();
        let Some(server) = server_for(&self.routing, text.trim_end_matches('.')) else {
            return answer_of(ResponseCode::Refused);
        };
        let key = Key { name, qtype: query.query_type(), class: query.query_class() };
        if let Some(hit) = self.cache().get(&key, Instant::now()) {
            return hit;
        }
        let mut ask = Message::query();
        ask.metadata.recursion_desired = true;
        ask.add_query(query.clone());
        if let Some(size) = udp_size {
            let mut edns = Edns::new();
            edns.set_max_payload(size.clamp(512, MAX_UDP_SIZE));
            ask.set_edns(edns);
        }
        match self.forward.exchange(&ask, server).await {
            Ok(reply) => {
                let mut answer = answer_of(reply.metadata.response_code);
                answer.answers = reply.answers;
                answer.authorities = reply.authorities;
                answer.additionals = reply.additionals;
                self.cache().insert(key, answer.clone(), Instant::now());
                answer
            }
            Err(e) => {
                tracing::debug!(%server, name = %query.name(), "DNS forward failed: {e}");
                match query.query_type() {
                    RecordType::AAAA => answer_of(ResponseCode::NoError),
                    _ => answer_of(ResponseCode::ServFail),
                }
            }
        }
    }
}

/// An answer with `rcode` and no records.
fn answer_of(rcode: ResponseCode) -> Message {
    let mut m = Message::response(0, OpCode::Query);
    m.metadata.response_code = rcode;
    m
}

#[async_trait::async_trait]
impl<F: Forward> RequestHandler for Resolver<F> {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut handle: R) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        // hickory cuts a UDP answer to the size of the response's EDNS
        // record: the client's, as its Catalog does; 512 without one.
        let edns = request.edns.as_ref().map(|theirs| {
            let mut ours = Edns::new();
            ours.set_max_payload(theirs.max_payload().max(512));
            ours
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let query = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => info.query.original().clone(),
            Ok(_) => {
                metadata.response_code = ResponseCode::NotImp;
                return send(&mut handle, builder.build_no_records(metadata)).await;
            }
            Err(_) => {
                metadata.response_code = ResponseCode::FormErr;
                return send(&mut handle, builder.build_no_records(metadata)).await;
            }
        };
        let answer = self.resolve(&query, request.edns.as_ref().map(Edns::max_payload)).await;
        metadata.response_code = answer.metadata.response_code;
        let response = builder.build(metadata, &answer.answers, &answer.authorities, [], &answer.additionals);
        send(&mut handle, response).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
        impl Iterator<Item = &'a hickory_server::proto::rr::Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let mut failed = *response.metadata();
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!("sending a DNS answer: {e}");
            failed.response_code = ResponseCode::ServFail;
            failed.message_type = MessageType::Response;
            ResponseInfo::from(Header { metadata: failed, counts: HeaderCounts::default() })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::Ipv4Addr;
    use std::str::FromStr;
    use std::sync::Arc;

    use hickory_server::proto::rr::rdata::{A, SOA};
    use hickory_server::proto::rr::{Name, RData, Record};
    use tpd_tunnel::io::{read_dns_tcp, write_dns_tcp};

    use super::*;

    fn agent() -> SocketAddr {
        SocketAddr::from((AGENT_TUNNEL_IP, AGENT_DNS_PORT))
    }

    fn upstream() -> SocketAddr {
        "192.0.2.53:53".parse().unwrap()
    }

    #[test]
    fn routes_cluster_names_to_the_agent() {
        let r = Dns { upstream: Some(upstream()), ..Dns::default() };
        assert_eq!(server_for(&r, "echo.default.svc.cluster.local"), Some(agent()));
        assert_eq!(server_for(&r, "example.org"), Some(upstream()));
        let all = Dns { all_to_cluster: true, upstream: None, ..r };
        assert_eq!(server_for(&all, "example.org"), Some(agent()));
        let none = Dns { all_to_cluster: false, ..all };
        assert_eq!(server_for(&none, "example.org"), None);
    }

    /// What a [`Fake`] was asked: name, server, EDNS size.
    type Asked = Arc<Mutex<Vec<(String, SocketAddr, Option<u16>)>>>;

    /// A nameserver in memory: answers each name as `answer` says, counts
    /// what it was asked and by whom; `None` stands for no answer.
    struct Fake {
        asked: Asked,
        answer: fn(&str) -> Option<Message>,
    }

    impl Forward for Fake {
        async fn exchange(&self, query: &Message, server: SocketAddr) -> io::Result<Message> {
            let name = query.queries[0].name().to_string();
            let size = query.edns.as_ref().map(Edns::max_payload);
            self.asked.lock().unwrap().push((name.clone(), server, size));
            (self.answer)(&name).ok_or_else(|| io::ErrorKind::TimedOut.into())
        }
    }

    fn response(rcode: ResponseCode) -> Message {
        answer_of(rcode)
    }

    /// `N.pods.` has N A records; `nx.*` does not exist (SOA minimum 5 s);
    /// `nosoa.*` does not exist and says no more; `down.*` gets no answer.
    fn zone(name: &str) -> Option<Message> {
        let first = name.split('.').next().unwrap_or_default();
        if name.starts_with("down.") {
            return None;
        }
        if name.starts_with("nx.") || name.starts_with("nosoa.") {
            let mut m = response(ResponseCode::NXDomain);
            if name.starts_with("nx.") {
                let soa = SOA::new(Name::root(), Name::root(), 1, 7200, 1800, 86400, 5);
                m.authorities.push(Record::from_rdata(Name::from_str("cluster.local.").unwrap(), 30, RData::SOA(soa)));
            }
            return Some(m);
        }
        let n: u8 = first.parse().unwrap_or(1);
        let mut m = response(ResponseCode::NoError);
        m.answers = (1..=n)
            .map(|i| Record::from_rdata(Name::from_str(name).unwrap(), 30, RData::A(A(Ipv4Addr::new(10, 1, 0, i)))))
            .collect();
        Some(m)
    }

    fn resolver(routing: Dns) -> (Resolver<Fake>, Asked) {
        let asked = Asked::default();
        (Resolver::new(routing, Fake { asked: asked.clone(), answer: zone }), asked)
    }

    fn q(name: &str, qtype: RecordType) -> Query {
        Query::query(Name::from_str(name).unwrap(), qtype)
    }

    fn routing() -> Dns {
        Dns { upstream: Some(upstream()), ..Dns::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_crosses_the_tunnel_once_per_ttl() {
        let (r, asked) = resolver(routing());
        let name = "1.echo.ns.svc.cluster.local.";
        assert_eq!(r.resolve(&q(name, RecordType::A), None).await.answers.len(), 1);
        tokio::time::advance(Duration::from_secs(29)).await;
        let again = r.resolve(&q(name, RecordType::A), None).await;
        assert_eq!(again.answers[0].ttl, 1, "aged in the cache");
        assert_eq!(asked.lock().unwrap().len(), 1);
        assert_eq!(asked.lock().unwrap()[0].1, agent());
        tokio::time::advance(Duration::from_secs(1)).await;
        r.resolve(&q(name, RecordType::A), None).await;
        assert_eq!(asked.lock().unwrap().len(), 2, "expired: asked again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_search_path_miss_crosses_once_per_soa_minimum() {
        let (r, asked) = resolver(Dns { all_to_cluster: true, ..routing() });
        let miss = "nx.default.svc.cluster.local.corp.example.";
        for _ in 0..3 {
            let a = r.resolve(&q(miss, RecordType::A), None).await;
            assert_eq!(a.metadata.response_code, ResponseCode::NXDomain);
            assert_eq!(a.authorities.len(), 1, "the SOA goes to the client too");
        }
        assert_eq!(asked.lock().unwrap().len(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        r.resolve(&q(miss, RecordType::A), None).await;
        assert_eq!(asked.lock().unwrap().len(), 2);
        // Without an SOA nothing says how long the name is absent.
        for _ in 0..2 {
            r.resolve(&q("nosoa.example.", RecordType::A), None).await;
        }
        assert_eq!(asked.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn unanswered_aaaa_is_empty_and_anything_else_a_failure() {
        let (r, asked) = resolver(routing());
        let aaaa = r.resolve(&q("down.ns.svc.cluster.local.", RecordType::AAAA), None).await;
        assert_eq!((aaaa.metadata.response_code, aaaa.answers.len()), (ResponseCode::NoError, 0));
        let a = r.resolve(&q("down.ns.svc.cluster.local.", RecordType::A), None).await;
        assert_eq!(a.metadata.response_code, ResponseCode::ServFail);
        r.resolve(&q("down.ns.svc.cluster.local.", RecordType::A), None).await;
        assert_eq!(asked.lock().unwrap().len(), 3, "failures are not cached");
    }

    #[tokio::test]
    async fn names_outside_the_cluster_go_upstream_or_are_refused() {
        let (r, asked) = resolver(routing());
        r.resolve(&q("example.org.", RecordType::A), Some(1232)).await;
        assert_eq!(asked.lock().unwrap()[0], ("example.org.".into(), upstream(), Some(1232)), "with the client's size");
        let (none, asked) = resolver(Dns { upstream: None, ..routing() });
        let refused = none.resolve(&q("example.org.", RecordType::A), None).await;
        assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
        assert!(asked.lock().unwrap().is_empty());
    }

    fn query_bytes(name: &str, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(q(name, RecordType::A));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// The server as the sidecar runs it, on loopback, over a resolver
    /// whose nameserver counts its questions: 40 addresses come cut over
    /// UDP without EDNS, whole with room for them or over TCP, and all
    /// from one forwarded question.
    #[tokio::test]
    async fn serves_udp_with_truncation_and_tcp_whole() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(at).await.unwrap();
        let (r, asked) = resolver(routing());
        let mut server = Server::new(r);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_QUEUE);
        let name = "40.big.ns.svc.cluster.local.";

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 65536];
        for (edns, truncated, records) in [(None, true, 0..40), (Some(4096), false, 40..41)] {
            client.send_to(&query_bytes(name, edns), at).await.unwrap();
            let n = client.recv(&mut buf).await.unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert!(n <= usize::from(edns.unwrap_or(512)));
            assert_eq!(m.metadata.truncation, truncated, "{edns:?}");
            assert!(records.contains(&m.answers.len()), "{edns:?}: {}", m.answers.len());
        }
        let mut sock = tokio::net::TcpStream::connect(at).await.unwrap();
        write_dns_tcp(&mut sock, &query_bytes(name, None)).await.unwrap();
        let m = Message::from_vec(&read_dns_tcp(&mut sock).await.unwrap().unwrap()).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 40);
        assert_eq!(asked.lock().unwrap().len(), 1, "answered from the cache after the first");
        server.shutdown_token().cancel();
    }

    #[tokio::test]
    async fn a_query_with_two_questions_is_a_format_error() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let at = udp.local_addr().unwrap();
        let (r, _) = resolver(routing());
        let mut server = Server::new(r);
        server.register_socket(udp);
        let mut m = Message::query();
        m.add_query(q("a.cluster.local.", RecordType::A));
        m.add_query(q("b.cluster.local.", RecordType::A));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(&m.to_vec().unwrap(), at).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().metadata.response_code, ResponseCode::FormErr);
        server.shutdown_token().cancel();
    }
}
