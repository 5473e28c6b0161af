//! Cluster DNS: answers for `cluster.local` from a snapshot of the services,
//! everything else is forwarded to the host's resolver. The answering is a
//! pure function of the query and the snapshot, and so is fitting the answer
//! to what the client can take over UDP ([`encode`]), as CoreDNS does.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::layout;

/// Records live short: endpoints change while tests run.
const TTL: u32 = 5;

/// What DNS knows about one Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRecord {
    /// None for headless services.
    pub cluster_ip: Option<Ipv4Addr>,
    /// Ready endpoint addresses (what a headless name resolves to).
    pub endpoints: Vec<Ipv4Addr>,
    pub external_name: Option<String>,
    /// (port name, protocol in lower case, port)
    pub ports: Vec<(String, String, u16)>,
}

/// The cluster as DNS sees it: services by (namespace, name).
#[derive(Debug, Clone, Default)]
pub struct Zone {
    pub services: HashMap<(String, String), ServiceRecord>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Answer(Message),
    /// Not ours: relay the query to the upstream resolver.
    Forward,
}

/// What a client takes over UDP without EDNS (RFC 1035 4.2.1).
const UDP_CLASSIC: u16 = 512;

/// The largest reply `query`'s client takes over UDP: 512 bytes, or the
/// size its EDNS OPT record advertises, never less than 512 (RFC 6891 6.2.5).
/// Over TCP a reply may be as large as its 2-byte length prefix says.
pub fn udp_limit(query: &Message) -> u16 {
    query.edns.as_ref().map_or(UDP_CLASSIC, Edns::max_payload).max(UDP_CLASSIC)
}

/// Answers `query` from `zone`.
pub fn answer(query: &Message, zone: &Zone) -> Reply {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = query.queries.clone();
    if let Some(asked) = &query.edns {
        // An EDNS query gets an OPT record back (RFC 6891 7), with the
        // size CoreDNS puts there: the client's own.
        let mut edns = Edns::new();
        edns.set_max_payload(asked.max_payload());
        resp.edns = Some(edns);
    }
    let (Some(q), true) = (
        query.queries.first(),
        query.metadata.op_code == OpCode::Query && query.metadata.message_type == MessageType::Query,
    ) else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return Reply::Answer(resp);
    };
    let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let suffix = format!(".{}", layout::CLUSTER_DOMAIN);
    let Some(local) = name.strip_suffix(&suffix) else {
        return if name == layout::CLUSTER_DOMAIN { Reply::Answer(resp) } else { Reply::Forward };
    };
    resp.metadata.authoritative = true;
    let labels: Vec<&str> = local.split('.').collect();
    match labels.as_slice() {
        [svc, ns, "svc"] => service(q, &mut resp, zone, ns, svc),
        [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
            srv(q, &mut resp, zone, ns, svc, &port[1..], &proto[1..]);
        }
        [ip, _ns, "pod"] => match ip.replace('-', ".").parse::<Ipv4Addr>() {
            Ok(addr) if q.query_type() == RecordType::A => {
                resp.answers.push(Record::from_rdata(q.name().clone(), TTL, RData::A(A(addr))))
            }
            Ok(_) => {}
            Err(_) => resp.metadata.response_code = ResponseCode::NXDomain,
        },
        // Namespaces and the zone's own structure exist, with no records.
        [ns, "svc"] if zone.services.keys().any(|(n, _)| n == ns) => {}
        ["svc"] | ["pod"] => {}
        _ => resp.metadata.response_code = ResponseCode::NXDomain,
    }
    if resp.answers.is_empty() {
        resp.authorities.push(soa());
    }
    Reply::Answer(resp)
}

/// The zone's SOA, which CoreDNS puts in the authority section of every
/// negative answer (NXDOMAIN, or no record of the type asked), with the
/// records' TTL as its minimum: how long resolvers may cache the absence
/// (RFC 2308).
fn soa() -> Record {
    let zone = format!("{}.", layout::CLUSTER_DOMAIN);
    let name = |n: &str| Name::from_ascii(format!("{n}.{zone}")).unwrap_or_else(|_| Name::root());
    let soa = SOA::new(name("ns.dns"), name("hostmaster"), 1, 7200, 1800, 86400, TTL);
    Record::from_rdata(Name::from_ascii(&zone).unwrap_or_else(|_| Name::root()), TTL, RData::SOA(soa))
}

fn service(q: &Query, resp: &mut Message, zone: &Zone, ns: &str, svc: &str) {
    let Some(rec) = zone.services.get(&(ns.to_owned(), svc.to_owned())) else {
        resp.metadata.response_code = ResponseCode::NXDomain;
        return;
    };
    if let Some(target) = &rec.external_name {
        let target = target.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(name) = Name::from_ascii(format!("{target}.")) {
            resp.answers.push(Record::from_rdata(q.name().clone(), TTL, RData::CNAME(CNAME(name.clone()))));
            // A stub resolver does not chase a CNAME itself: add the
            // target's addresses when it is a service of this cluster.
            let in_cluster = target
                .strip_suffix(&format!(".svc.{}", layout::CLUSTER_DOMAIN))
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(svc, ns)| zone.services.get(&(ns.to_owned(), svc.to_owned())))
                .filter(|r| r.external_name.is_none());
            if let (Some(r), RecordType::A) = (in_cluster, q.query_type()) {
                let ips = r.cluster_ip.map_or_else(|| r.endpoints.clone(), |ip| vec![ip]);
                resp.answers.extend(ips.into_iter().map(|ip| Record::from_rdata(name.clone(), TTL, RData::A(A(ip)))));
            }
        }
        return;
    }
    if q.query_type() != RecordType::A {
        // AAAA and the rest: the name exists, with no such records.
        return;
    }
    let ips = rec.cluster_ip.map_or_else(|| rec.endpoints.clone(), |ip| vec![ip]);
    resp.answers.extend(ips.into_iter().map(|ip| Record::from_rdata(q.name().clone(), TTL, RData::A(A(ip)))));
}

fn srv(q: &Query, resp: &mut Message, zone: &Zone, ns: &str, svc: &str, port: &str, proto: &str) {
    let Some(rec) = zone.services.get(&(ns.to_owned(), svc.to_owned())) else {
        resp.metadata.response_code = ResponseCode::NXDomain;
        return;
    };
    let Some((_, _, number)) = rec.ports.iter().find(|(n, p, _)| n == port && p == proto) else {
        resp.metadata.response_code = ResponseCode::NXDomain;
        return;
    };
    if q.query_type() != RecordType::SRV {
        return;
    }
    let Ok(target) = Name::from_ascii(format!("{svc}.{ns}.svc.{}.", layout::CLUSTER_DOMAIN)) else {
        return;
    };
    resp.answers.push(Record::from_rdata(q.name().clone(), TTL, RData::SRV(SRV::new(0, 100, *number, target.clone()))));
    if let Some(ip) = rec.cluster_ip {
        resp.additionals.push(Record::from_rdata(target, TTL, RData::A(A(ip))));
    }
}

/// `reply`'s bytes in at most `limit` bytes, as CoreDNS's `Scrub` cuts an
/// answer (miekg/dns `Msg.Truncate`): whole records are kept in order,
/// answers, then authorities, then additionals, while they fit beside the
/// OPT record, and TC is set when any had to go, so the client retries over
/// TCP. None when even the header and question do not fit.
pub fn encode(reply: &Message, limit: u16) -> Option<Vec<u8>> {
    let whole = reply.to_vec().ok()?;
    if whole.len() <= usize::from(limit) {
        return Some(whole);
    }
    let mut cut = reply.clone();
    cut.metadata.truncation = true;
    let sections =
        [std::mem::take(&mut cut.answers), std::mem::take(&mut cut.authorities), std::mem::take(&mut cut.additionals)];
    let fits = |m: &Message| m.to_vec().ok().filter(|b| b.len() <= usize::from(limit));
    let mut best = fits(&cut)?;
    'sections: for (n, records) in sections.into_iter().enumerate() {
        for record in records {
            [&mut cut.answers, &mut cut.authorities, &mut cut.additionals][n].push(record);
            match fits(&cut) {
                Some(bytes) => best = bytes,
                None => break 'sections,
            }
        }
    }
    Some(best)
}

/// The nameservers in a resolv.conf, for forwarding.
pub fn upstreams(resolv_conf: &str) -> Vec<std::net::IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zone() -> Zone {
        let mut z = Zone::default();
        z.services.insert(
            ("demo".into(), "hello".into()),
            ServiceRecord {
                cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 20)),
                ports: vec![("http".into(), "tcp".into(), 80)],
                ..Default::default()
            },
        );
        z.services.insert(
            ("demo".into(), "db".into()),
            ServiceRecord {
                endpoints: vec![Ipv4Addr::new(10, 100, 0, 1), Ipv4Addr::new(10, 100, 0, 2)],
                ..Default::default()
            },
        );
        z.services.insert(
            ("demo".into(), "alias".into()),
            ServiceRecord { external_name: Some("hello.demo.svc.cluster.local".into()), ..Default::default() },
        );
        z.services.insert(
            ("demo".into(), "ext".into()),
            ServiceRecord { external_name: Some("example.org".into()), ..Default::default() },
        );
        z
    }

    fn ask(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        m
    }

    fn answered(r: Reply) -> Message {
        match r {
            Reply::Answer(m) => m,
            Reply::Forward => panic!("forwarded"),
        }
    }

    #[test]
    fn services_headless_external_and_srv() {
        let z = zone();
        let m = answered(answer(&ask("hello.demo.svc.cluster.local.", RecordType::A), &z));
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(10, 96, 0, 20))));

        let m = answered(answer(&ask("HELLO.demo.svc.cluster.local.", RecordType::AAAA), &z));
        assert_eq!((m.metadata.response_code, m.answers.len()), (ResponseCode::NoError, 0));

        let m = answered(answer(&ask("db.demo.svc.cluster.local.", RecordType::A), &z));
        assert_eq!(m.answers.len(), 2);

        let m = answered(answer(&ask("ext.demo.svc.cluster.local.", RecordType::A), &z));
        assert!(matches!(&m.answers[0].data, RData::CNAME(c) if c.0.to_ascii() == "example.org."));

        let m = answered(answer(&ask("alias.demo.svc.cluster.local.", RecordType::A), &z));
        assert_eq!(m.answers.len(), 2, "CNAME and the target's A: {:?}", m.answers);
        assert_eq!(m.answers[1].data, RData::A(A(Ipv4Addr::new(10, 96, 0, 20))));

        let m = answered(answer(&ask("_http._tcp.hello.demo.svc.cluster.local.", RecordType::SRV), &z));
        assert!(matches!(&m.answers[0].data, RData::SRV(s) if s.port == 80));

        // The search path's first tries (hello.demo.demo.svc...) must be NXDOMAIN.
        let m = answered(answer(&ask("hello.demo.demo.svc.cluster.local.", RecordType::A), &z));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = answered(answer(&ask("nope.demo.svc.cluster.local.", RecordType::A), &z));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // Negative answers carry the zone's SOA, which says how long to cache them.
        assert!(matches!(&m.authorities[..], [r] if matches!(&r.data, RData::SOA(soa) if soa.minimum == TTL)));
        let m = answered(answer(&ask("HELLO.demo.svc.cluster.local.", RecordType::AAAA), &z));
        assert_eq!(m.authorities.len(), 1, "NODATA too");

        let m = answered(answer(&ask("10-100-0-9.demo.pod.cluster.local.", RecordType::A), &z));
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(10, 100, 0, 9))));

        assert_eq!(answer(&ask("example.org.", RecordType::A), &z), Reply::Forward);
    }

    /// A headless service of `n` ready pods, asked for by a client that
    /// advertises `edns` bytes (None: no OPT record).
    fn headless(n: u8, edns: Option<u16>) -> (Message, Message) {
        let mut z = Zone::default();
        let endpoints = (1..=n).map(|i| Ipv4Addr::new(10, 100, 1, i)).collect();
        z.services.insert(("demo".into(), "big".into()), ServiceRecord { endpoints, ..Default::default() });
        let mut q = ask("big.demo.svc.cluster.local.", RecordType::A);
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            q.edns = Some(e);
        }
        let reply = answered(answer(&q, &z));
        (q, reply)
    }

    #[test]
    fn large_udp_answers_are_truncated_to_what_the_client_takes() {
        // 40 A records: 684 bytes, more than a client without EDNS takes.
        let (q, reply) = headless(40, None);
        assert_eq!(reply.answers.len(), 40);
        assert_eq!(udp_limit(&q), 512);
        let bytes = encode(&reply, udp_limit(&q)).expect("fits");
        let got = Message::from_vec(&bytes).expect("decodes");
        assert!(bytes.len() <= 512, "{} bytes", bytes.len());
        assert!(got.metadata.truncation, "TC set");
        assert_eq!(got.answers.len(), 29, "the records that fit, in order");
        assert_eq!(got.answers[..], reply.answers[..29]);
        assert_eq!((got.metadata.id, &got.queries), (7, &q.queries));

        // Over TCP (64 KiB) the same answer goes whole.
        let got = Message::from_vec(&encode(&reply, u16::MAX).expect("fits")).expect("decodes");
        assert_eq!((got.metadata.truncation, got.answers.len()), (false, 40));

        // What fits goes as it is: no TC.
        let (q, small) = headless(3, None);
        let got = Message::from_vec(&encode(&small, udp_limit(&q)).expect("fits")).expect("decodes");
        assert_eq!((got.metadata.truncation, got.answers.len()), (false, 3));
    }

    #[test]
    fn edns_raises_the_udp_limit_and_is_answered_with_an_opt_record() {
        let (q, reply) = headless(40, Some(4096));
        assert_eq!(udp_limit(&q), 4096);
        let got = Message::from_vec(&encode(&reply, udp_limit(&q)).expect("fits")).expect("decodes");
        assert_eq!((got.metadata.truncation, got.answers.len()), (false, 40));
        assert_eq!(got.edns.as_ref().map(Edns::max_payload), Some(4096), "the OPT record comes back");

        // An advertised size under 512 counts as 512 (RFC 6891 6.2.5); the
        // OPT record is kept in a truncated answer and counted in its size.
        let (q, reply) = headless(40, Some(100));
        assert_eq!(udp_limit(&q), 512);
        let bytes = encode(&reply, udp_limit(&q)).expect("fits");
        let got = Message::from_vec(&bytes).expect("decodes");
        assert!(bytes.len() <= 512 && got.metadata.truncation, "{} bytes", bytes.len());
        assert_eq!(got.answers.len(), 28, "one record less than without the OPT record");
        assert!(got.edns.is_some());

        // 1232 bytes, the usual EDNS size, hold 40 addresses but not 80.
        let (q, reply) = headless(80, Some(1232));
        let got = Message::from_vec(&encode(&reply, udp_limit(&q)).expect("fits")).expect("decodes");
        assert!(got.metadata.truncation && got.answers.len() < 80, "{}", got.answers.len());
    }

    #[test]
    fn resolv_conf_nameservers() {
        assert_eq!(upstreams("# x\nnameserver 192.0.2.1\nsearch a\nnameserver ::1\n").len(), 2);
    }

    proptest! {
        /// Whatever bytes arrive, decoding either fails or yields a reply.
        #[test]
        fn never_panics_on_wire_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = Message::from_vec(&bytes)
                && let Reply::Answer(reply) = answer(&m, &zone())
            {
                let _ = encode(&reply, udp_limit(&m));
            }
        }
    }
}
