//! Personal intercepts: what the CLI, the sidecar and the agents that join
//! an intercepted workload's pods agree on.
//!
//! An intercept agent runs beside the real container in every pod of the
//! workload and listens on ports of its own ([`Config`]); the Services point
//! there. For every HTTP request it reads, the first [`Route`] whose port
//! and [`Filter`] match sends it to that route's session, anything else goes
//! to the real container on the pod's loopback.
//!
//! Sessions tell each agent about themselves on its intercept port:
//! - [`Kind::Register`] streams, admitted only over the pod's loopback
//!   (where a port-forward lands), carry [`Request`]s from the CLI and the
//!   agent's [`Reply`]s. A session's routes live while it renews them
//!   within [`LEASE`]; only the stream that registered a session (or a
//!   later one with its token) can change or remove them.
//! - [`Kind::Relay`] streams, from another agent of the workload over the
//!   pod network, carry one request to the session's home agent (the one
//!   its WireGuard tunnel reaches), which sends it on to the developer's
//!   container; a [`RelayHeader`] with the session's token opens each.
//!
//! A route with [`Mirror`] takes nothing: the real container answers the
//! requests it matches, and the session gets a copy of each, whose answer
//! is thrown away. Each reply tells the session its [`Traffic`] on that
//! agent, which `tpd status` shows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::preamble::Kind;

/// How long an agent keeps a session's routes without hearing from it:
/// past this, requests that match them go to the real container.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often the CLI renews on every agent (three renewals per lease).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Name of the container tpd adds to each pod of an intercepted workload.
pub const AGENT_CONTAINER: &str = "tpd-intercept";
/// Container port names on that container; Services target the
/// `listen_port_name` of the port they targeted before.
pub const TRANSPORT_PORT_NAME: &str = "tpd-transport";
pub const INTERCEPT_PORT_NAME: &str = "tpd-intercept";

/// The name of the agent's port that stands in for the container's `remote`
/// port (an IANA service name: at most 15 characters, with a letter).
pub fn listen_port_name(remote: u16) -> String {
    format!("tpd-{remote}")
}

/// What the CLI puts in the agent's `TPD_AGENT_INTERCEPT` variable: the
/// agent then runs beside the app instead of in its place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The WireGuard transport's port (TCP, admitted over loopback only).
    pub transport: u16,
    /// Where sessions register and other agents relay ([`Kind::Register`], [`Kind::Relay`]).
    pub intercept: u16,
    /// One listener per intercepted port of the real container.
    pub ports: Vec<PortMap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    /// The real container's port, where unmatched requests go (on 127.0.0.1).
    pub remote: u16,
    /// The agent's own port that Services now target.
    pub listen: u16,
}

/// Which requests a route takes: all of its headers (names compared without
/// case, values exactly), all of its baggage members (in the W3C `baggage`
/// header, which tracing libraries carry from service to service) and,
/// when given, a path that starts with `path_prefix`. An empty filter is
/// accepted only on a mirroring route: on any other, that is a swap.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Filter {
    /// Header name (lower case) to the exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Baggage member key to its exact (decoded) value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baggage: BTreeMap<String, String>,
}

/// The W3C baggage header (<https://www.w3.org/TR/baggage/>).
pub const BAGGAGE_HEADER: &str = "baggage";

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.path_prefix.is_none() && self.baggage.is_empty()
    }

    /// Whether a request with `path` (its origin-form target, query
    /// included) and headers looked up by `header` (a lower-case name to
    /// every value it has) matches.
    pub fn matches<'a, I>(&self, path: &str, header: impl Fn(&str) -> I) -> bool
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let path_ok = self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p));
        let headers_ok = self.headers.iter().all(|(name, want)| header(name).into_iter().any(|v| v == want.as_bytes()));
        path_ok && headers_ok && (self.baggage.is_empty() || self.baggage_matches(header(BAGGAGE_HEADER)))
    }

    /// Whether every wanted member is among those of the `baggage` values
    /// (a request may split its baggage over several header lines).
    fn baggage_matches<'a>(&self, values: impl IntoIterator<Item = &'a [u8]>) -> bool {
        let members: Vec<(String, String)> = values.into_iter().flat_map(baggage_members).collect();
        self.baggage.iter().all(|(key, want)| members.iter().any(|(k, v)| k == key && v == want))
    }
}

/// The members of one `baggage` header value as (key, decoded value):
/// `key=value;property, key2 = value2`; properties are ignored, and a
/// member that is not `key=value` is skipped, as the spec says to.
fn baggage_members(value: &[u8]) -> Vec<(String, String)> {
    let Ok(value) = std::str::from_utf8(value) else {
        return Vec::new();
    };
    value
        .split(',')
        .filter_map(|member| {
            let pair = member.split(';').next()?;
            let (key, value) = pair.split_once('=')?;
            let value = percent_encoding::percent_decode_str(value.trim()).decode_utf8().ok()?;
            Some((key.trim().to_owned(), value.into_owned()))
        })
        .collect()
}

impl std::fmt::Display for Filter {
    /// As the user wrote it: `x-dev=alice baggage:dev=alice path=/api*`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.extend(self.baggage.iter().map(|(k, v)| format!("baggage:{k}={v}")));
        if let Some(p) = &self.path_prefix {
            parts.push(format!("path={p}*"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// What a session takes, as the user asked: `requests with x-dev=alice`,
/// or for a mirror `copies of requests with x-dev=alice` (`copies of every
/// request` unfiltered).
pub fn describe(filter: &Filter, mirror: Option<Mirror>) -> String {
    match (mirror, filter.is_empty()) {
        (None, _) => format!("requests with {filter}"),
        (Some(_), true) => "copies of every request".to_owned(),
        (Some(_), false) => format!("copies of requests with {filter}"),
    }
}

/// `KEY=VALUE` from `--baggage`: a member key is a token, as a header
/// name is, kept as written (baggage keys are case-sensitive).
pub fn parse_baggage(s: &str) -> Result<(String, String), String> {
    let (_, value) = parse_header(s).map_err(|e| e.replace("HTTP header name", "baggage key"))?;
    let key = s.split_once('=').map(|(k, _)| k.to_owned()).unwrap_or_default();
    Ok((key, value))
}

/// `NAME=VALUE` from `--header`; the name is a token (RFC 9110), kept in lower case.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("{name:?} is not a valid HTTP header name"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(format!("the value of header {name} has a control character"));
    }
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

/// One intercepted port and the requests on it that go to the session.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    /// The real container's port.
    pub port: u16,
    pub filter: Filter,
    /// Copies instead of the requests themselves; then an empty filter
    /// (every request) is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

/// How a mirroring route copies requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Mirror {
    /// Bytes of a request body copied; past it the copy is cut and carries
    /// [`MIRROR_TRUNCATED_HEADER`].
    pub body_limit: u64,
}

/// The default [`Mirror::body_limit`]: 1 MiB.
pub const MIRROR_BODY_LIMIT: u64 = 1 << 20;
/// On every copy, so the developer's app can tell one from a request.
pub const MIRROR_HEADER: &str = "tpd-mirror";
/// On a copy whose body was cut at the limit; the value is the limit.
pub const MIRROR_TRUNCATED_HEADER: &str = "tpd-mirror-truncated";

/// What one agent did for a session, as of its reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Requests (or, mirroring, copies) sent to the session in the last 60 s.
    #[serde(default)]
    pub last_minute: u64,
    /// Copies the session answered, since it registered.
    #[serde(default)]
    pub mirrored: u64,
    /// Copies dropped because the session was slow or gone.
    #[serde(default)]
    pub dropped: u64,
    /// The session's ports where this agent saw TLS, which no filter can
    /// read: those requests go to the real container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_ports: Vec<u16>,
}

impl Traffic {
    /// The sum of several agents' figures (TLS ports without repeats).
    pub fn add(&mut self, other: &Traffic) {
        self.last_minute += other.last_minute;
        self.mirrored += other.mirrored;
        self.dropped += other.dropped;
        for p in &other.tls_ports {
            if !self.tls_ports.contains(p) {
                self.tls_ports.push(*p);
            }
        }
        self.tls_ports.sort_unstable();
    }
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok { .. })
    }
}

/// CLI -> agent on a [`Kind::Register`] stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Adds the session's routes, or replaces them (same session and token).
    Register {
        session: String,
        /// A secret of the session's: relays must show it, and only a
        /// stream that shows it may change the session's routes.
        token: String,
        /// `user@host` and since when (RFC 3339), for refusals.
        holder: String,
        since: String,
        /// The intercept port of the session's home agent (pod IP): the
        /// agent whose tunnel the session's sidecar holds. An agent that is
        /// not it relays matching requests there.
        home: SocketAddr,
        routes: Vec<Route>,
    },
    /// Keeps the session's routes for another [`LEASE`].
    Renew,
    /// Removes the session's routes at once (the session is ending).
    Unregister,
}

/// Agent -> CLI, one per [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        #[serde(default)]
        traffic: Traffic,
    },
    /// A route equal to one of a live session's, or a session id held with
    /// another token; `message` says which and who holds it.
    Refused { message: String },
}

/// What opens a [`Kind::Relay`] stream: the agent that read the request
/// asks the home agent to carry one connection to the session's `port`.
/// The home agent answers one byte, 1 when the developer's side accepted
/// (then the stream is that connection), 0 otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayHeader {
    pub session: String,
    pub token: String,
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{decode, encode};
    use bytes::BytesMut;

    fn filter(headers: &[(&str, &str)], path: Option<&str>) -> Filter {
        Filter {
            headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            path_prefix: path.map(str::to_owned),
            ..Filter::default()
        }
    }

    #[test]
    fn every_part_of_a_filter_must_match() {
        let f = filter(&[("x-dev", "alice")], Some("/api"));
        let alice = |n: &str| if n == "x-dev" { vec![&b"alice"[..]] } else { vec![] };
        let bob = |n: &str| if n == "x-dev" { vec![&b"bob"[..]] } else { vec![] };
        assert!(f.matches("/api/users?x=1", alice));
        assert!(!f.matches("/web", alice));
        assert!(!f.matches("/api", bob));
        assert!(!f.matches("/api", |_| Vec::<&[u8]>::new()));
        // A repeated header matches when any of its values does.
        assert!(f.matches("/api", |_| vec![&b"bob"[..], &b"alice"[..]]));
        // Values are exact: no prefix, no case folding.
        assert!(!f.matches("/api", |_| vec![&b"Alice"[..]]));
    }

    #[test]
    fn baggage_members_match_wherever_they_are_in_the_header() {
        let f = Filter { baggage: [("dev".into(), "alice".into())].into(), ..Filter::default() };
        let with = |values: Vec<&'static str>| {
            move |n: &str| if n == BAGGAGE_HEADER { values.iter().map(|v| v.as_bytes()).collect() } else { vec![] }
        };
        assert!(f.matches("/", with(vec!["dev=alice"])));
        assert!(f.matches("/", with(vec!["userId=7, dev = alice ;ttl=3, tenant=x"])));
        assert!(f.matches("/", with(vec!["userId=7", "dev=alice"])));
        // Values are percent-decoded; keys and values are exact.
        let spaced = Filter { baggage: [("dev".into(), "alice b".into())].into(), ..Filter::default() };
        assert!(spaced.matches("/", with(vec!["dev=alice%20b"])));
        assert!(!f.matches("/", with(vec!["dev=alicex", "Dev=alice", "mydev=alice"])));
        assert!(!f.matches("/", with(vec!["x-dev: alice"])));
        assert!(!f.matches("/", |_: &str| Vec::<&[u8]>::new()));
        assert_eq!(f.to_string(), "baggage:dev=alice");
        assert!(!f.is_empty());
        assert_eq!(parse_baggage("Dev=alice"), Ok(("Dev".into(), "alice".into())));
        assert!(parse_baggage("dev").is_err());
    }

    #[test]
    fn headers_parse_as_the_user_writes_them() {
        assert_eq!(parse_header("X-Dev=alice"), Ok(("x-dev".into(), "alice".into())));
        assert_eq!(parse_header("x-dev=a=b"), Ok(("x-dev".into(), "a=b".into())));
        assert!(parse_header("x-dev").is_err());
        assert!(parse_header("=alice").is_err());
        assert!(parse_header("x dev=alice").is_err());
        assert!(parse_header("x-dev=a\nb").is_err());
        assert_eq!(filter(&[("x-dev", "alice")], Some("/api")).to_string(), "x-dev=alice path=/api*");
        let mirror = Some(Mirror { body_limit: MIRROR_BODY_LIMIT });
        assert_eq!(describe(&filter(&[("x-dev", "alice")], None), None), "requests with x-dev=alice");
        assert_eq!(describe(&filter(&[("x-dev", "alice")], None), mirror), "copies of requests with x-dev=alice");
        assert_eq!(describe(&Filter::default(), mirror), "copies of every request");
    }

    #[test]
    fn requests_round_trip_in_the_control_framing() {
        let msgs = vec![
            Request::Register {
                session: "abc".into(),
                token: "t".into(),
                holder: "alice@laptop".into(),
                since: "2026-12-07T10:00:00Z".into(),
                home: "10.244.0.7:7704".parse().unwrap(),
                routes: vec![
                    Route { port: 8080, filter: filter(&[("x-dev", "alice")], None), mirror: None },
                    Route { port: 9090, filter: Filter::default(), mirror: Some(Mirror { body_limit: 10 }) },
                ],
            },
            Request::Renew,
            Request::Unregister,
        ];
        let mut buf = BytesMut::new();
        for m in &msgs {
            encode(m, &mut buf).unwrap();
        }
        let mut got = Vec::new();
        while let Some(m) = decode::<Request>(&mut buf).unwrap() {
            got.push(m);
        }
        assert_eq!(got, msgs);
        let json = serde_json::to_string(&Reply::Refused { message: "held".into() }).unwrap();
        assert_eq!(json, r#"{"type":"refused","message":"held"}"#);
        // A reply without figures is a reply with none.
        let ok: Reply = serde_json::from_str(r#"{"type":"ok"}"#).unwrap();
        assert_eq!(ok, Reply::Ok { traffic: Traffic::default() });
    }

    #[test]
    fn traffic_of_several_agents_adds_up() {
        let mut sum = Traffic::default();
        sum.add(&Traffic { last_minute: 3, mirrored: 5, dropped: 1, tls_ports: vec![8443] });
        sum.add(&Traffic { last_minute: 2, mirrored: 1, dropped: 0, tls_ports: vec![8443, 443] });
        assert_eq!(sum, Traffic { last_minute: 5, mirrored: 6, dropped: 1, tls_ports: vec![443, 8443] });
    }
}
