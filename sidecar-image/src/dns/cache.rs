//! The sidecar's DNS cache: answers by question, kept for their TTL, and
//! negative answers (NXDOMAIN, or NOERROR with no answer: NODATA) for the
//! SOA minimum of their authority section (RFC 2308), so a search-path
//! miss such as `api.default.svc.cluster.local.corp.example` crosses the
//! tunnel once per TTL, not once per lookup. No IO: the caller passes the
//! time (tokio's clock, so tests pause it).

use std::collections::HashMap;
use std::time::Duration;

use hickory_server::proto::op::{Message, ResponseCode};
use hickory_server::proto::rr::{DNSClass, LowerName, RData, RecordType};
use tokio::time::Instant;

/// Entries kept at most; a full cache drops what expires soonest.
pub const CAPACITY: usize = 4096;
/// No answer is kept longer than this, whatever its TTL (CoreDNS's cache
/// has the same ceiling), so a record changed upstream is seen within it.
const MAX_TTL: u32 = 3600;

/// What an answer is cached by: the question.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub name: LowerName,
    pub qtype: RecordType,
    pub class: DNSClass,
}

struct Entry {
    answer: Message,
    stored: Instant,
    expires: Instant,
}

pub struct Cache {
    entries: HashMap<Key, Entry>,
    capacity: usize,
}

impl Default for Cache {
    fn default() -> Self {
        Cache::with_capacity(CAPACITY)
    }
}

impl Cache {
    pub fn with_capacity(capacity: usize) -> Self {
        Cache { entries: HashMap::new(), capacity: capacity.max(1) }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The answer cached for `key`, its TTLs lowered by the time it was
    /// kept; `None` when there is none or it expired.
    pub fn get(&mut self, key: &Key, now: Instant) -> Option<Message> {
        let entry = self.entries.get(key)?;
        if entry.expires <= now {
            self.entries.remove(key);
            return None;
        }
        let aged = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let mut answer = entry.answer.clone();
        for record in answer.answers.iter_mut().chain(&mut answer.authorities).chain(&mut answer.additionals) {
            record.ttl = record.ttl.saturating_sub(aged);
        }
        Some(answer)
    }

    /// Keeps `answer` for as long as [`lifetime`] allows (not at all when
    /// it gives none).
    pub fn insert(&mut self, key: Key, answer: Message, now: Instant) {
        let Some(ttl) = lifetime(&answer) else {
            return;
        };
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            self.entries.retain(|_, e| e.expires > now);
            if self.entries.len() >= self.capacity
                && let Some(soonest) = self.entries.iter().min_by_key(|(_, e)| e.expires).map(|(k, _)| k.clone())
            {
                self.entries.remove(&soonest);
            }
        }
        let expires = now + Duration::from_secs(u64::from(ttl));
        self.entries.insert(key, Entry { answer, stored: now, expires });
    }
}

/// How long an answer may be kept, in seconds: the lowest TTL of its
/// answers; for a negative answer, the lower of its SOA's TTL and minimum.
/// `None` for what is not kept: failures, truncated answers, a TTL of 0, a
/// negative answer without an SOA (RFC 2308 5).
pub fn lifetime(answer: &Message) -> Option<u32> {
    if answer.metadata.truncation {
        return None;
    }
    let ttl = match answer.metadata.response_code {
        ResponseCode::NoError if !answer.answers.is_empty() => answer.answers.iter().map(|r| r.ttl).min()?,
        ResponseCode::NoError | ResponseCode::NXDomain => answer
            .authorities
            .iter()
            .filter_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .min()?,
        _ => return None,
    };
    (ttl > 0).then_some(ttl.min(MAX_TTL))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    use hickory_server::proto::op::{MessageType, OpCode};
    use hickory_server::proto::rr::rdata::{A, SOA};
    use hickory_server::proto::rr::{Name, Record};

    use super::*;

    pub fn key(name: &str, qtype: RecordType) -> Key {
        Key { name: LowerName::from(Name::from_str(name).unwrap()), qtype, class: DNSClass::IN }
    }

    fn response(rcode: ResponseCode) -> Message {
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m
    }

    fn a(name: &str, ttl: u32) -> Message {
        let mut m = response(ResponseCode::NoError);
        m.answers.push(Record::from_rdata(Name::from_str(name).unwrap(), ttl, RData::A(A(Ipv4Addr::new(10, 0, 0, 1)))));
        m
    }

    fn negative(rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = response(rcode);
        let zone = Name::from_str("cluster.local.").unwrap();
        let soa = SOA::new(
            Name::from_str("ns.dns.cluster.local.").unwrap(),
            Name::from_str("hostmaster.cluster.local.").unwrap(),
            1,
            7200,
            1800,
            86400,
            minimum,
        );
        m.authorities.push(Record::from_rdata(zone, soa_ttl, RData::SOA(soa)));
        m
    }

    #[test]
    fn lifetimes() {
        let mut two = a("x.", 30);
        two.answers.push(Record::from_rdata(Name::from_str("x.").unwrap(), 5, RData::A(A(Ipv4Addr::LOCALHOST))));
        assert_eq!(lifetime(&two), Some(5), "the lowest TTL");
        assert_eq!(lifetime(&a("x.", 0)), None);
        assert_eq!(lifetime(&a("x.", 86400)), Some(MAX_TTL));
        assert_eq!(lifetime(&negative(ResponseCode::NXDomain, 30, 5)), Some(5), "the SOA minimum");
        assert_eq!(lifetime(&negative(ResponseCode::NoError, 3, 60)), Some(3), "the SOA's own TTL when lower");
        assert_eq!(lifetime(&response(ResponseCode::NXDomain)), None, "no SOA: not kept");
        assert_eq!(lifetime(&response(ResponseCode::ServFail)), None);
        let mut cut = a("x.", 30);
        cut.metadata.truncation = true;
        assert_eq!(lifetime(&cut), None);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_live_for_their_ttl_and_age_in_it() {
        let mut cache = Cache::default();
        let k = key("echo.ns.svc.cluster.local.", RecordType::A);
        cache.insert(k.clone(), a("echo.ns.svc.cluster.local.", 30), Instant::now());
        tokio::time::advance(Duration::from_secs(12)).await;
        let hit = cache.get(&k, Instant::now()).unwrap();
        assert_eq!(hit.answers[0].ttl, 18);
        assert!(cache.get(&key("ECHO.ns.svc.cluster.local.", RecordType::A), Instant::now()).is_some(), "any case");
        assert!(cache.get(&key("echo.ns.svc.cluster.local.", RecordType::AAAA), Instant::now()).is_none());
        tokio::time::advance(Duration::from_secs(18)).await;
        assert!(cache.get(&k, Instant::now()).is_none(), "expired");
        assert_eq!(cache.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_negative_answer_lives_for_the_soa_minimum() {
        let mut cache = Cache::default();
        let k = key("api.default.svc.cluster.local.corp.example.", RecordType::A);
        cache.insert(k.clone(), negative(ResponseCode::NXDomain, 30, 5), Instant::now());
        tokio::time::advance(Duration::from_secs(4)).await;
        let hit = cache.get(&k, Instant::now()).unwrap();
        assert_eq!(hit.metadata.response_code, ResponseCode::NXDomain);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cache.get(&k, Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_cache_drops_what_expires_first() {
        let mut cache = Cache::with_capacity(3);
        let now = Instant::now();
        for (name, ttl) in [("a.", 10), ("b.", 5), ("c.", 20)] {
            cache.insert(key(name, RecordType::A), a(name, ttl), now);
        }
        cache.insert(key("d.", RecordType::A), a("d.", 30), now);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&key("b.", RecordType::A), now).is_none());
        for name in ["a.", "c.", "d."] {
            assert!(cache.get(&key(name, RecordType::A), now).is_some(), "{name}");
        }
        // Expired entries go first.
        tokio::time::advance(Duration::from_secs(11)).await;
        cache.insert(key("e.", RecordType::A), a("e.", 30), Instant::now());
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&key("c.", RecordType::A), Instant::now()).is_some());
    }
}
