//! The CLI ↔ sidecar contract. The CLI starts `tpd-sidecar run --config
//! JSON` with a [`Config`]; once the session is ready the sidecar writes a
//! [`Status`] to `status.json` in the session directory (the env the
//! developer's container gets) and prints one [`Event`] line on stdout,
//! which also carries a fatal error.
//!
//! Addresses, CIDRs and port maps serialise as the strings a person would
//! write (`udp:10.0.0.1:7700`, `10.96.0.0/12`, `8080:3000`), so a
//! sidecar's configuration reads well in `docker inspect`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::names;
use crate::neighbours::Declared;

/// How the sidecar runs a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// How WireGuard reaches the agent.
    pub transport: Transport,
    /// For a UDP transport, where the key exchange stream goes (by default
    /// TCP to the same address); see [`Config::hello_at`].
    #[serde(default)]
    pub hello: Option<Endpoint>,
    /// For a UDP transport: when no answer comes over UDP within this long
    /// after the first handshake, WireGuard moves onto the hello stream.
    #[serde(default, with = "seconds")]
    pub udp_fallback: Option<Duration>,
    /// CIDRs routed into the tunnel: the cluster's, and `--also-proxy`'s.
    #[serde(default)]
    pub routes: Vec<Cidr>,
    /// Inbound connections to the agent's port `remote` reach 127.0.0.1:`local`.
    #[serde(default)]
    pub ports: Vec<PortMap>,
    #[serde(default)]
    pub dns: Dns,
    /// Where `status.json` goes (the CLI binds the session directory there).
    #[serde(default = "session_dir")]
    pub session_dir: PathBuf,
    /// Set to FUSE-mount the agent's volumes before announcing ready.
    #[serde(default)]
    pub volumes: Option<Volumes>,
    /// Ports of the pod's loopback carried to 127.0.0.1 from the start:
    /// those the pod's other containers declare and `--pod-port`'s. The
    /// agent reports the ports it finds listening on top of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_ports: Vec<Declared>,
    /// The session id, sent in the control hello (an intercept agent
    /// delivers the session's requests over the tunnel that names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

impl Config {
    /// A configuration with every default: no routes, no ports, no volumes.
    pub fn new(transport: Transport) -> Self {
        Config {
            transport,
            hello: None,
            udp_fallback: None,
            routes: Vec::new(),
            ports: Vec::new(),
            dns: Dns::default(),
            session_dir: session_dir(),
            volumes: None,
            pod_ports: Vec::new(),
            session: None,
        }
    }

    /// Where the key exchange stream goes.
    pub fn hello_at(&self) -> Endpoint {
        match (&self.transport, &self.hello) {
            (_, Some(at)) => at.clone(),
            (Transport::Stream(at), None) => at.clone(),
            (Transport::Udp(addr), None) => Endpoint::Tcp(*addr),
        }
    }

    /// `REMOTE -> LOCAL` for the inbound port map.
    pub fn port_map(&self) -> HashMap<u16, u16> {
        self.ports.iter().map(|p| (p.remote, p.local)).collect()
    }
}

fn session_dir() -> PathBuf {
    names::SESSION_DIR.into()
}

/// The sidecar's DNS server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    /// Names under this domain are resolved by the agent.
    pub cluster_domain: String,
    /// Resolve every name through the agent.
    pub all_to_cluster: bool,
    /// The resolver for names outside the cluster; without one they are refused.
    pub upstream: Option<SocketAddr>,
    /// Where the server listens.
    pub listen: SocketAddr,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            cluster_domain: "cluster.local".into(),
            all_to_cluster: false,
            upstream: None,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 53)),
        }
    }
}

/// The remote volumes' mounts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volumes {
    /// How long a volume request waits for a lost connection to the agent
    /// (its pod replaced) to come back before the program gets EIO.
    #[serde(with = "seconds::required")]
    pub retry_for: Duration,
    /// Keep names, attributes and missing names until the agent reports a
    /// change (`--volume-cache`, on by default); off, every operation asks.
    #[serde(default = "cache_on")]
    pub cache: bool,
}

fn cache_on() -> bool {
    true
}

/// Where the sidecar dials the byte stream to the agent:
/// `stream:tcp:IP:PORT` or `stream:unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// What carries WireGuard: `stream:tcp:IP:PORT`, `stream:unix:/path` or
/// `udp:IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Transport {
    /// WireGuard frames over the stream.
    Stream(Endpoint),
    /// WireGuard datagrams over UDP; the hello stream carries only the key exchange.
    Udp(SocketAddr),
}

impl FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let addr = |a: &str| a.parse::<SocketAddr>().map_err(|e| format!("{a:?} is not IP:PORT ({e})"));
        if let Some(rest) = s.strip_prefix("stream:tcp:") {
            Ok(Transport::Stream(Endpoint::Tcp(addr(rest)?)))
        } else if let Some(rest) = s.strip_prefix("stream:unix:") {
            Ok(Transport::Stream(Endpoint::Unix(rest.into())))
        } else if let Some(rest) = s.strip_prefix("udp:") {
            Ok(Transport::Udp(addr(rest)?))
        } else {
            Err(format!("unknown transport {s:?}: use stream:tcp:IP:PORT, stream:unix:/path or udp:IP:PORT"))
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Stream(e) => e.fmt(f),
            Transport::Udp(addr) => write!(f, "udp:{addr}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match Transport::from_str(s)? {
            Transport::Stream(e) => Ok(e),
            Transport::Udp(_) => Err("the hello stream must be stream:tcp:… or stream:unix:…".into()),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "stream:tcp:{addr}"),
            Endpoint::Unix(path) => write!(f, "stream:unix:{}", path.display()),
        }
    }
}

/// An IPv4 CIDR such as `10.96.0.0/12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn mask(prefix: u8) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(Cidr::mask(self.prefix)))
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s.split_once('/').unwrap_or((s, "32"));
        let addr = ip.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let prefix =
            prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

/// `REMOTE:LOCAL` (or `PORT` for the same on both sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortMap {
    pub remote: u16,
    pub local: u16,
}

impl FromStr for PortMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| p.parse::<u16>().map_err(|e| format!("{s:?}: {e}"));
        match s.split_once(':') {
            Some((r, l)) => Ok(PortMap { remote: port(r)?, local: port(l)? }),
            None => Ok(PortMap { remote: port(s)?, local: port(s)? }),
        }
    }
}

impl fmt::Display for PortMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.remote, self.local)
    }
}

/// Serde through the `FromStr` and `Display` above.
macro_rules! string_serde {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    )*};
}
string_serde!(Transport, Endpoint, Cidr, PortMap);

/// What carries WireGuard for a ready session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    Udp,
    Stream,
}

/// What `status.json` holds once the session is ready. The file has mode
/// 0600: `env` holds the app's secrets, and nothing else may log it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub protocol_version: u16,
    pub sidecar_version: String,
    pub agent_version: String,
    pub tunnel_ip: Ipv4Addr,
    pub agent_tunnel_ip: Ipv4Addr,
    /// Unset only while the transport is still being decided.
    pub transport: Option<Carrier>,
    /// The agent's process env minus tpd's variables.
    pub env: BTreeMap<String, String>,
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Status")
            .field("agent_version", &self.agent_version)
            .field("transport", &self.transport)
            .field("env", &format_args!("({} variables)", self.env.len()))
            .finish_non_exhaustive()
    }
}

/// The sidecar's stdout: one line of JSON per event, never the env.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// The session is up; the status file holds the rest.
    Ready { protocol_version: u16, agent_version: String, status_file: PathBuf },
    /// The sidecar stopped on a fatal error.
    Error { message: String },
    /// Something the developer should know that does not stop the session
    /// (a pod port the developer's side already holds); the CLI prints it.
    Warning { message: String },
}

impl Event {
    /// The event on a line of the sidecar's output, if it holds one.
    pub fn from_line(line: &str) -> Option<Event> {
        serde_json::from_str(line.trim()).ok()
    }
}

/// Durations as (fractional) seconds, as a person writes them.
mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?.map(to_duration::<D>).transpose()
    }

    fn to_duration<'de, D: Deserializer<'de>>(secs: f64) -> Result<Duration, D::Error> {
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }

    pub mod required {
        use super::*;

        pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_f64(d.as_secs_f64())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
            to_duration::<D>(f64::deserialize(d)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports() {
        assert_eq!(
            "stream:tcp:10.0.0.1:7700".parse(),
            Ok(Transport::Stream(Endpoint::Tcp("10.0.0.1:7700".parse().unwrap())))
        );
        assert_eq!(
            "stream:unix:/run/tpd/agent.sock".parse(),
            Ok(Transport::Stream(Endpoint::Unix("/run/tpd/agent.sock".into())))
        );
        assert_eq!("udp:10.0.0.1:7700".parse(), Ok(Transport::Udp("10.0.0.1:7700".parse().unwrap())));
        assert!("tcp:1.2.3.4:5".parse::<Transport>().unwrap_err().contains("stream:tcp"));
        assert!("udp:host:5".parse::<Transport>().is_err());
        assert!("udp:1.2.3.4:5".parse::<Endpoint>().is_err());
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.96.5.7/12".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 96, 0, 0));
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert_eq!(Cidr::mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().prefix, 32);
        assert!("1.2.3.4/33".parse::<Cidr>().is_err());
    }

    #[test]
    fn ports() {
        assert_eq!("8080:3000".parse(), Ok(PortMap { remote: 8080, local: 3000 }));
        assert_eq!("80".parse(), Ok(PortMap { remote: 80, local: 80 }));
    }

    #[test]
    fn a_config_reads_as_written_and_comes_back_equal() {
        let mut config = Config::new("udp:10.0.0.1:7700".parse().unwrap());
        config.hello = Some("stream:unix:/run/tpd/agent.sock".parse().unwrap());
        config.udp_fallback = Some(Duration::from_millis(1500));
        config.routes = vec!["10.96.0.0/12".parse().unwrap()];
        config.ports = vec!["8080:3000".parse().unwrap()];
        config.volumes = Some(Volumes { retry_for: Duration::from_secs(30), cache: false });
        config.pod_ports = vec![Declared { port: "53/udp".parse().unwrap(), owner: "container dns".into() }];
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["pod_ports"][0], serde_json::json!({"port": "53/udp", "owner": "container dns"}));
        assert_eq!(json["transport"], "udp:10.0.0.1:7700");
        assert_eq!(json["udp_fallback"], 1.5);
        assert_eq!(json["routes"][0], "10.96.0.0/12");
        assert_eq!(json["ports"][0], "8080:3000");
        assert_eq!(serde_json::from_value::<Config>(json).unwrap(), config);
        assert_eq!(config.port_map(), HashMap::from([(8080, 3000)]));
    }

    #[test]
    fn a_minimal_config_gets_the_defaults() {
        let config: Config = serde_json::from_str(r#"{"transport":"udp:10.0.0.1:7700"}"#).unwrap();
        assert_eq!(config, Config::new(Transport::Udp("10.0.0.1:7700".parse().unwrap())));
        assert_eq!(config.hello_at(), Endpoint::Tcp("10.0.0.1:7700".parse().unwrap()));
        assert_eq!(config.session_dir, PathBuf::from(names::SESSION_DIR));
        let bad = serde_json::from_str::<Config>(r#"{"transport":"tcp:1.2.3.4:5"}"#).unwrap_err();
        assert!(bad.to_string().contains("use stream:tcp"), "{bad}");
    }

    #[test]
    fn events_are_one_tagged_line() {
        let ready = Event::Ready { protocol_version: 3, agent_version: "0.1.0".into(), status_file: "/s".into() };
        let line = serde_json::to_string(&ready).unwrap();
        assert!(line.starts_with(r#"{"event":"ready""#), "{line}");
        assert_eq!(Event::from_line(&format!("{line}\n")), Some(ready));
        assert_eq!(
            Event::from_line(r#"{"event":"error","message":"no TUN"}"#),
            Some(Event::Error { message: "no TUN".into() })
        );
        assert_eq!(
            Event::from_line(r#"{"event":"warning","message":"port 6379 is taken"}"#),
            Some(Event::Warning { message: "port 6379 is taken".into() })
        );
        assert_eq!(Event::from_line("2026-12-07T01:45:22Z INFO tunnel up"), None);
    }

    #[test]
    fn a_status_never_shows_its_env_in_debug() {
        let status = Status {
            protocol_version: 3,
            sidecar_version: "0.1.0".into(),
            agent_version: "0.1.0".into(),
            tunnel_ip: Ipv4Addr::new(198, 18, 0, 2),
            agent_tunnel_ip: Ipv4Addr::new(198, 18, 0, 1),
            transport: Some(Carrier::Udp),
            env: BTreeMap::from([("DB_PASSWORD".into(), "s3cret".into())]),
        };
        assert!(!format!("{status:?}").contains("s3cret"));
        let back: Status = serde_json::from_str(&serde_json::to_string(&status).unwrap()).unwrap();
        assert_eq!(back, status);
    }
}
