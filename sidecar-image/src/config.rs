//! The sidecar's command-line values and their parsing: transports, CIDRs,
//! port mappings. Pure, unit-tested.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// Where the sidecar dials the byte stream to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// `stream:tcp:IP:PORT`, `stream:unix:/path` or `udp:IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// WireGuard frames over the stream.
    Stream(Endpoint),
    /// WireGuard datagrams over UDP; the stream (`--hello`, by default TCP to
    /// the same address) carries only the key exchange.
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

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match Transport::from_str(s)? {
            Transport::Stream(e) => Ok(e),
            Transport::Udp(_) => Err("the hello stream must be stream:tcp:… or stream:unix:…".into()),
        }
    }
}

/// An IPv4 CIDR such as `10.96.0.0/12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The local port for a remote one; unmapped ports keep their number.
pub fn local_port(maps: &HashMap<u16, u16>, remote: u16) -> u16 {
    maps.get(&remote).copied().unwrap_or(remote)
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
        let maps = HashMap::from([(8080, 3000)]);
        assert_eq!((local_port(&maps, 8080), local_port(&maps, 9)), (3000, 9));
    }
}
