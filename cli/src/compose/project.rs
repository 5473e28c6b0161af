//! The parts of a compose project that decide where a service can live: its
//! ports, network settings, profiles and the env keys the user sets. Parsed
//! from YAML text only (no IO), so the generator's tests feed it real files.
//!
//! tpd reads the project as `docker compose config` prints it (the user's
//! files merged, `env_file` folded into `environment`, variables
//! interpolated), so one parser covers every way users write their files;
//! both the short and the long syntaxes are understood anyway, because the
//! two compose versions print ports differently.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::Value;

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error("the compose configuration is not valid YAML")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("the compose configuration has no `services:` map")]
    NoServices,
    #[error("service {service:?}: cannot read `{key}`: {why}")]
    Field { service: String, key: &'static str, why: String },
}

/// A compose project as far as tpd cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Project {
    /// The `version:` the user's files declare, repeated in the override so
    /// docker-compose v1 merges the two as one format.
    pub version: Option<String>,
    pub services: BTreeMap<String, Service>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    pub ports: Vec<Port>,
    /// Container ports from `expose:`, with their protocol.
    pub expose: Vec<(u16, Proto)>,
    pub network_mode: Option<String>,
    /// Networks named under `networks:`; empty means the project's default.
    pub networks: BTreeSet<String>,
    pub profiles: Vec<String>,
    /// Keys the user sets in `environment:` (where `compose config` has also
    /// folded the `env_file:` entries); their values win over the remote env.
    pub env_keys: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One `ports:` entry: the container port(s) it publishes and how the user
/// wrote it, for the note that tells where it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub spec: String,
    pub targets: Vec<u16>,
    pub proto: Proto,
}

impl Project {
    pub fn parse(yaml: &str) -> Result<Self, ProjectError> {
        let doc: Value = serde_yaml_ng::from_str(yaml)?;
        let version = doc.get("version").and_then(scalar);
        let Some(services) = doc.get("services").and_then(Value::as_mapping) else {
            return Err(ProjectError::NoServices);
        };
        let mut out = BTreeMap::new();
        for (name, body) in services {
            let name = scalar(name).ok_or(ProjectError::NoServices)?;
            let service = Service::parse(&name, body)?;
            out.insert(name, service);
        }
        Ok(Project { version, services: out })
    }
}

impl Service {
    fn parse(name: &str, body: &Value) -> Result<Self, ProjectError> {
        let field = |key: &'static str, why: String| ProjectError::Field { service: name.to_string(), key, why };
        let ports =
            list(body.get("ports")).iter().map(Port::parse).collect::<Result<_, _>>().map_err(|w| field("ports", w))?;
        let expose = list(body.get("expose"))
            .iter()
            .map(parse_expose)
            .collect::<Result<_, _>>()
            .map_err(|w| field("expose", w))?;
        Ok(Service {
            ports,
            expose,
            network_mode: body.get("network_mode").and_then(scalar),
            networks: names(body.get("networks")),
            profiles: list(body.get("profiles")).iter().filter_map(scalar).collect(),
            env_keys: env_keys(body.get("environment")),
        })
    }

    /// Whether the service sits on the project's default network.
    pub fn on_default_network(&self) -> bool {
        self.network_mode.is_none() && (self.networks.is_empty() || self.networks.contains("default"))
    }

    /// Every port the service listens on inside its namespace.
    pub fn listening(&self) -> impl Iterator<Item = (u16, Proto)> + '_ {
        self.ports.iter().flat_map(|p| p.targets.iter().map(move |t| (*t, p.proto))).chain(self.expose.iter().copied())
    }
}

impl Port {
    fn parse(value: &Value) -> Result<Self, String> {
        match value {
            Value::Mapping(_) => Self::parse_long(value),
            other => {
                let spec = scalar(other).ok_or("expected a string, a number or a map")?;
                Self::parse_short(&spec)
            }
        }
    }

    /// `[[IP:]HOST:]CONTAINER[-END][/PROTO]`; IPv6 host IPs come bracketed.
    fn parse_short(spec: &str) -> Result<Self, String> {
        let (addr, proto) = match spec.rsplit_once('/') {
            Some((a, p)) => (a, parse_proto(p)?),
            None => (spec, Proto::Tcp),
        };
        let container = addr.rsplit(':').next().unwrap_or(addr);
        Ok(Port { spec: spec.to_string(), targets: parse_range(container)?, proto })
    }

    fn parse_long(value: &Value) -> Result<Self, String> {
        let target = value.get("target").and_then(scalar).ok_or("a long-syntax port needs `target`")?;
        let proto = value.get("protocol").and_then(scalar).map(|p| parse_proto(&p)).transpose()?.unwrap_or(Proto::Tcp);
        let published = value.get("published").and_then(scalar);
        let host_ip = value.get("host_ip").and_then(scalar);
        let spec = match (host_ip, published) {
            (Some(ip), Some(p)) => format!("{ip}:{p}:{target}"),
            (None, Some(p)) => format!("{p}:{target}"),
            _ => target.clone(),
        };
        let spec = if proto == Proto::Udp { format!("{spec}/udp") } else { spec };
        Ok(Port { spec, targets: parse_range(&target)?, proto })
    }
}

fn parse_expose(value: &Value) -> Result<(u16, Proto), String> {
    let port = Port::parse_short(&scalar(value).ok_or("expected a port")?)?;
    port.targets.first().map(|t| (*t, port.proto)).ok_or_else(|| "empty port".to_string())
}

fn parse_proto(p: &str) -> Result<Proto, String> {
    match p.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        other => Err(format!("unsupported protocol {other:?}")),
    }
}

/// `8080` or `8000-8002`.
fn parse_range(s: &str) -> Result<Vec<u16>, String> {
    let num = |x: &str| x.trim().parse::<u16>().map_err(|_| format!("{s:?} is not a port"));
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("{s:?} is an empty range"));
            }
            Ok((a..=b).collect())
        }
        None => Ok(vec![num(s)?]),
    }
}

/// A scalar as text (compose accepts numbers where it means strings).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn list(v: Option<&Value>) -> Vec<Value> {
    v.and_then(Value::as_sequence).cloned().unwrap_or_default()
}

/// Names from a list (`[a, b]`) or the keys of a map (`{a: {...}}`).
fn names(v: Option<&Value>) -> BTreeSet<String> {
    match v {
        Some(Value::Mapping(m)) => m.keys().filter_map(scalar).collect(),
        Some(Value::Sequence(s)) => s.iter().filter_map(scalar).collect(),
        _ => BTreeSet::new(),
    }
}

/// `environment:` as a map, or as a list of `KEY=VALUE` / `KEY`.
fn env_keys(v: Option<&Value>) -> BTreeSet<String> {
    match v {
        Some(Value::Sequence(s)) => s
            .iter()
            .filter_map(scalar)
            .map(|kv| kv.split_once('=').map_or(kv.clone(), |(k, _)| k.to_string()))
            .collect(),
        other => names(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_ports() {
        let p = Project::parse(
            "services:\n  a:\n    image: x\n    ports: [\"8081:8080\", 9000, \"127.0.0.1:53:53/udp\", \"7000-7001:7000-7001\", \"[::1]:80:8080\"]\n  \
             b:\n    image: x\n    ports:\n      - {target: 80, published: 8080, protocol: tcp}\n      - target: 53\n        protocol: udp\n",
        )
        .unwrap();
        let a = &p.services["a"];
        let targets: Vec<_> = a.listening().collect();
        assert_eq!(
            targets,
            vec![
                (8080, Proto::Tcp),
                (9000, Proto::Tcp),
                (53, Proto::Udp),
                (7000, Proto::Tcp),
                (7001, Proto::Tcp),
                (8080, Proto::Tcp)
            ]
        );
        let b = &p.services["b"];
        assert_eq!(b.ports[0].spec, "8080:80");
        assert_eq!(b.ports[1].spec, "53/udp");
        assert_eq!(b.ports[1].proto, Proto::Udp);
    }

    #[test]
    fn networks_env_and_profiles() {
        let p = Project::parse(
            "version: '3.8'\nservices:\n  a:\n    image: x\n    networks: [back]\n    environment: [A=1, B]\n    profiles: [dev]\n  \
             b:\n    image: x\n    networks: {default: {}, back: {aliases: [bb]}}\n    environment: {C: 'x'}\n  \
             c:\n    image: x\n    network_mode: host\n    expose: ['9000/udp']\n",
        )
        .unwrap();
        assert_eq!(p.version.as_deref(), Some("3.8"));
        let (a, b, c) = (&p.services["a"], &p.services["b"], &p.services["c"]);
        assert!(!a.on_default_network() && b.on_default_network() && !c.on_default_network());
        assert_eq!(a.env_keys.iter().collect::<Vec<_>>(), ["A", "B"]);
        assert_eq!(b.env_keys.iter().collect::<Vec<_>>(), ["C"]);
        assert_eq!(a.profiles, ["dev"]);
        assert_eq!(c.network_mode.as_deref(), Some("host"));
        assert_eq!(c.listening().collect::<Vec<_>>(), [(9000, Proto::Udp)]);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(Project::parse("a: ["), Err(ProjectError::Yaml(_))));
        assert!(matches!(Project::parse("volumes: {}"), Err(ProjectError::NoServices)));
        let err = Project::parse("services:\n  a:\n    ports: [\"x:y\"]\n").unwrap_err();
        assert!(err.to_string().contains("service \"a\""), "{err}");
        assert!(Project::parse("services:\n  a:\n    ports: [\"90-80\"]\n").is_err());
        assert!(Project::parse("services:\n  a:\n    ports: [\"80/sctp\"]\n").is_err());
    }
}
