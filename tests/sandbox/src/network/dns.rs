//! Cluster DNS: answers for `cluster.local` from a snapshot of the services,
//! everything else is forwarded to the host's resolver. The answering is a
//! pure function of the query and the snapshot.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SRV};
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

/// Answers `query` from `zone`.
pub fn answer(query: &Message, zone: &Zone) -> Reply {
    let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.queries = query.queries.clone();
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
    Reply::Answer(resp)
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

        let m = answered(answer(&ask("10-100-0-9.demo.pod.cluster.local.", RecordType::A), &z));
        assert_eq!(m.answers[0].data, RData::A(A(Ipv4Addr::new(10, 100, 0, 9))));

        assert_eq!(answer(&ask("example.org.", RecordType::A), &z), Reply::Forward);
    }

    #[test]
    fn resolv_conf_nameservers() {
        assert_eq!(upstreams("# x\nnameserver 192.0.2.1\nsearch a\nnameserver ::1\n").len(), 2);
    }

    proptest! {
        /// Whatever bytes arrive, decoding either fails or yields a reply.
        #[test]
        fn never_panics_on_wire_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = Message::from_vec(&bytes) {
                let _ = answer(&m, &zone());
            }
        }
    }
}
