//! The little of DNS that the agent's forwarder needs, which keeps it free
//! of a DNS library: the question of a query and an empty answer (for a
//! query nobody answered in time, so AAAA lookups of cluster names end at
//! once instead of timing out). Queries are otherwise forwarded as they
//! are, so every record type (SRV, the CNAME of an ExternalName) passes
//! through. [`is_under`] is the sidecar's routing rule (the sidecar reads
//! messages with hickory).

const HEADER_LEN: usize = 12;
pub const TYPE_AAAA: u16 = 28;
pub const RCODE_SERVFAIL: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lower-case, dot-separated, without the trailing dot ("" for the root).
    pub name: String,
    pub qtype: u16,
    /// Bytes of header + question, the prefix an answer echoes.
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("DNS message shorter than its header")]
    Short,
    #[error("DNS message is not a query with exactly one question")]
    NotOneQuestion,
    #[error("malformed name in DNS question")]
    BadName,
}

/// Parses the single question of a query.
pub fn question(msg: &[u8]) -> Result<Question, Error> {
    if msg.len() < HEADER_LEN {
        return Err(Error::Short);
    }
    let is_response = msg[2] & 0x80 != 0;
    if is_response || u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return Err(Error::NotOneQuestion);
    }
    let mut labels = Vec::new();
    let mut i = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(i).ok_or(Error::BadName)?);
        i += 1;
        if len == 0 {
            break;
        }
        // Queries carry no compression pointers; anything above 63 is malformed.
        if len > 63 {
            return Err(Error::BadName);
        }
        let label = msg.get(i..i + len).ok_or(Error::BadName)?;
        // The name is routed as dot-joined text: a dot inside a label would
        // make it name other labels than the query's.
        if label.contains(&b'.') {
            return Err(Error::BadName);
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let qtype = msg.get(i..i + 2).ok_or(Error::BadName)?;
    let qtype = u16::from_be_bytes([qtype[0], qtype[1]]);
    let end = i + 4;
    if msg.len() < end {
        return Err(Error::BadName);
    }
    Ok(Question { name: labels.join("."), qtype, end })
}

/// True when `name` is `domain` or under it (both without trailing dots).
pub fn is_under(name: &str, domain: &str) -> bool {
    let domain = domain.trim_matches('.');
    name == domain || name.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.'))
}

/// A response to `query` with no records and the given rcode.
pub fn empty_response(query: &[u8], rcode: u8) -> Result<Vec<u8>, Error> {
    let q = question(query)?;
    let mut out = query[..q.end].to_vec();
    out[2] = 0x80 | (query[2] & 0x79); // QR, keep opcode and RD
    out[3] = 0x80 | (rcode & 0x0f); // RA
    out[6..12].fill(0); // no answer, authority or additional records
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.').filter(|l| !l.is_empty()) {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn parses_and_routes() {
        let q = question(&query("Echo.NS.svc.cluster.local.", TYPE_AAAA)).unwrap();
        assert_eq!(q.name, "echo.ns.svc.cluster.local");
        assert_eq!(q.qtype, TYPE_AAAA);
        assert!(is_under(&q.name, "cluster.local"));
        assert!(is_under("cluster.local", "cluster.local."));
        assert!(!is_under("evilcluster.local", "cluster.local"));
    }

    /// Found by the `dns` fuzz target: one label "evil.cluster.local" read
    /// as the name evil.cluster.local, three labels, and was routed as one.
    #[test]
    fn a_label_with_a_dot_is_malformed() {
        let mut q = query("x", 1);
        q.splice(12..14, [18].into_iter().chain(*b"evil.cluster.local"));
        assert_eq!(question(&q), Err(Error::BadName));
    }

    #[test]
    fn empty_answer_echoes_id_and_question() {
        let qb = query("a.b", 1);
        let r = empty_response(&qb, 0).unwrap();
        assert_eq!(&r[..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(&r[12..], &qb[12..]);
        assert!(question(&r).is_err(), "a response is not a query");
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = question(&bytes);
            let _ = empty_response(&bytes, RCODE_SERVFAIL);
        }

        #[test]
        fn round_trip(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..5), qtype in any::<u16>()) {
            let name = labels.join(".");
            let q = question(&query(&name, qtype)).unwrap();
            prop_assert_eq!(q.name, name);
            prop_assert_eq!(q.qtype, qtype);
        }
    }
}
