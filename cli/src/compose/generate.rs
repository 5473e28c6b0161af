//! The override generator: from the user's compose project and a session,
//! the YAML file that moves the chosen services into the session sidecar's
//! network namespace. A pure function, so every rule below has a table test.
//!
//! How the pieces meet (checked with docker-compose v1 here, see the e2e
//! tests): a chosen service gets `network_mode: container:<sidecar>`; the
//! project's default network becomes the session's Docker network (external,
//! owned by tpd), which the sidecar is attached to; the other services name
//! the sidecar after each chosen service with `external_links`, so `web`
//! still reaches `api:8080` although `api` has no network endpoint of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_yaml_ng::value::{Tag, TaggedValue};
use serde_yaml_ng::{Mapping, Value};

use super::project::{Project, Proto};

/// Which compose reads the file. v1 (docker-compose 1.x) cannot remove list
/// entries in an override; v2 can, with the `!reset` tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    V1,
    V2,
}

/// A compose service that replaces a swapped Deployment's container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swapped {
    pub service: String,
    /// `deployment/NAME`, for the header.
    pub deployment: String,
    /// The remote container's env as the agent sees it.
    pub env: BTreeMap<String, String>,
    pub mounts: Vec<Mount>,
    /// Local ports the agent forwards cluster traffic to (the L of `--port R:L`).
    pub local_ports: Vec<u16>,
}

/// A remote volume as the session shows it on the host, and where the
/// container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub project: &'a Project,
    pub session: &'a str,
    pub sidecar: &'a str,
    /// The Docker network the sidecar is attached to, which the project's
    /// default network becomes.
    pub network: &'a str,
    pub flavor: Flavor,
    pub swapped: &'a [Swapped],
    /// Services that only need outbound access to the cluster.
    pub outbound: &'a [String],
}

/// A `ports:` entry that the sidecar must publish instead of its service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedPort {
    pub service: String,
    pub spec: String,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub yaml: String,
    pub moved_ports: Vec<MovedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerateError {
    #[error("the compose project has no service {service:?}")]
    UnknownService { service: String, known: Vec<String> },
    #[error("service {service:?} is chosen twice")]
    ChosenTwice { service: String },
    #[error("service {service:?} already sets `network_mode: {mode}`")]
    NetworkModeTaken { service: String, mode: String },
    #[error(
        "service {service:?} joins its own networks ({networks}), which a service in the sidecar's namespace cannot"
    )]
    OwnNetworks { service: String, networks: String },
    #[error("services {first:?} and {second:?} both listen on {port}/{proto} and would share one network namespace")]
    PortClash { port: u16, proto: &'static str, first: String, second: String },
    #[error(
        "service {service:?} publishes or exposes ports ({ports}), which docker-compose v1 cannot drop in an override file"
    )]
    PortsNeedV2 { service: String, ports: String },
}

impl GenerateError {
    /// The one thing the user should do next.
    pub fn help(&self) -> String {
        match self {
            Self::UnknownService { known, .. } => {
                format!("use one of: {} (`docker compose config --services` lists them)", known.join(", "))
            }
            Self::ChosenTwice { service } => {
                format!("name {service} once: either with --swap ... --service or with --outbound")
            }
            Self::NetworkModeTaken { service, mode } => {
                format!(
                    "remove `network_mode: {mode}` from service {service} while tpd runs it (tpd puts it in the sidecar's namespace), or do not choose it"
                )
            }
            Self::OwnNetworks { service, .. } => format!(
                "remove `networks:` from service {service} while tpd runs it: it shares the sidecar's network, which is on the project's default network"
            ),
            Self::PortClash { port, first, second, .. } => {
                format!("make {first} or {second} listen on another port than {port}, or choose only one of them")
            }
            Self::PortsNeedV2 { service, .. } => format!(
                "move `ports:` and `expose:` of {service} into a file you leave out under tpd (the sidecar publishes ports instead: `tpd connect -p HOST:CONTAINER`), or install the docker compose v2 plugin"
            ),
        }
    }
}

/// Builds the override file, or says why the project cannot run that way.
pub fn generate(req: &Request<'_>) -> Result<Generated, GenerateError> {
    let chosen = check(req)?;
    let mut moved = Vec::new();
    let mut services = Mapping::new();
    for name in &chosen {
        let svc = &req.project.services[*name];
        let mut body = Mapping::new();
        body.insert("network_mode".into(), format!("container:{}", req.sidecar).into());
        if !svc.ports.is_empty() {
            moved.extend(svc.ports.iter().map(|p| MovedPort { service: name.to_string(), spec: p.spec.clone() }));
            body.insert("ports".into(), reset_list());
        }
        if !svc.expose.is_empty() {
            body.insert("expose".into(), reset_list());
        }
        if let Some(swap) = req.swapped.iter().find(|s| s.service == **name) {
            insert_swap(&mut body, swap, &svc.env_keys);
        }
        services.insert((*name).into(), body.into());
    }
    let links: Vec<Value> = chosen.iter().map(|c| format!("{}:{c}", req.sidecar).into()).collect();
    for (name, svc) in &req.project.services {
        if !chosen.contains(&name.as_str()) && svc.on_default_network() {
            let mut body = Mapping::new();
            body.insert("external_links".into(), links.clone().into());
            services.insert(name.as_str().into(), body.into());
        }
    }
    let mut doc = Mapping::new();
    if let Some(version) = &req.project.version {
        doc.insert("version".into(), version.as_str().into());
    }
    doc.insert("services".into(), services.into());
    doc.insert("networks".into(), default_network(req.network));
    let body = serde_yaml_ng::to_string(&Value::Mapping(doc)).expect("a mapping of strings always serializes");
    Ok(Generated { yaml: format!("{}{body}", header(req, &chosen, &moved)), moved_ports: moved })
}

/// Validates the choice; returns the chosen service names in a stable order.
fn check<'a>(req: &'a Request<'_>) -> Result<Vec<&'a str>, GenerateError> {
    let names = req.swapped.iter().map(|s| s.service.as_str()).chain(req.outbound.iter().map(String::as_str));
    let mut chosen: Vec<&str> = Vec::new();
    for name in names {
        let Some(svc) = req.project.services.get(name) else {
            let known = req.project.services.keys().cloned().collect();
            return Err(GenerateError::UnknownService { service: name.to_string(), known });
        };
        if chosen.contains(&name) {
            return Err(GenerateError::ChosenTwice { service: name.to_string() });
        }
        if let Some(mode) = &svc.network_mode {
            return Err(GenerateError::NetworkModeTaken { service: name.to_string(), mode: mode.clone() });
        }
        // `docker compose config` (v2) lists `default` for every service, so
        // only other names are the user's; v1 lists only what the user wrote,
        // and compose refuses `network_mode` with any `networks:`.
        let own: Vec<&str> =
            svc.networks.iter().map(String::as_str).filter(|n| req.flavor == Flavor::V1 || *n != "default").collect();
        if !own.is_empty() {
            return Err(GenerateError::OwnNetworks { service: name.to_string(), networks: own.join(", ") });
        }
        // Docker refuses both publishing and exposing ports in another
        // container's namespace, and only v2 can drop them in an override.
        if req.flavor == Flavor::V1 && !(svc.ports.is_empty() && svc.expose.is_empty()) {
            let published = svc.ports.iter().map(|p| p.spec.clone());
            let exposed = svc
                .expose
                .iter()
                .map(|(p, proto)| format!("expose {p}{}", if *proto == Proto::Udp { "/udp" } else { "" }));
            let ports = published.chain(exposed).collect::<Vec<_>>().join(", ");
            return Err(GenerateError::PortsNeedV2 { service: name.to_string(), ports });
        }
        chosen.push(name);
    }
    check_port_clash(req, &chosen)?;
    Ok(chosen)
}

/// Services that share one namespace cannot listen on the same port.
fn check_port_clash(req: &Request<'_>, chosen: &[&str]) -> Result<(), GenerateError> {
    let mut owner: BTreeMap<(u16, Proto), &str> = BTreeMap::new();
    for name in chosen {
        let svc = &req.project.services[*name];
        let swap_ports = req
            .swapped
            .iter()
            .filter(|s| s.service == *name)
            .flat_map(|s| s.local_ports.iter().map(|p| (*p, Proto::Tcp)));
        let mine: BTreeSet<(u16, Proto)> = svc.listening().chain(swap_ports).collect();
        for key in mine {
            if let Some(first) = owner.insert(key, name) {
                let proto = if key.1 == Proto::Udp { "udp" } else { "tcp" };
                return Err(GenerateError::PortClash {
                    port: key.0,
                    proto,
                    first: first.to_string(),
                    second: name.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The remote env (the user's own keys win; `$` escaped so compose does not
/// interpolate the cluster's values) and the remote volumes.
fn insert_swap(body: &mut Mapping, swap: &Swapped, user_keys: &BTreeSet<String>) {
    let env: Mapping = swap
        .env
        .iter()
        .filter(|(k, _)| !user_keys.contains(*k))
        .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.replace('$', "$$"))))
        .collect();
    if !env.is_empty() {
        body.insert("environment".into(), env.into());
    }
    if !swap.mounts.is_empty() {
        // rslave: the session's FUSE mounts appear below the source after the
        // container starts (see DESIGN.md, "Seen working here").
        let volumes: Vec<Value> = swap
            .mounts
            .iter()
            .map(|m| format!("{}:{}:{}rslave", m.source, m.target, if m.read_only { "ro," } else { "" }).into())
            .collect();
        body.insert("volumes".into(), volumes.into());
    }
}

/// `!reset []`: compose v2 drops the user's list instead of merging into it.
fn reset_list() -> Value {
    Value::Tagged(Box::new(TaggedValue { tag: Tag::new("reset"), value: Value::Sequence(Vec::new()) }))
}

fn default_network(network: &str) -> Value {
    let mut default = Mapping::new();
    default.insert("name".into(), network.into());
    default.insert("external".into(), true.into());
    let mut networks = Mapping::new();
    networks.insert("default".into(), default.into());
    networks.into()
}

fn header(req: &Request<'_>, chosen: &[&str], moved: &[MovedPort]) -> String {
    let mut h = String::new();
    let w = &mut h;
    let _ = writeln!(
        w,
        "# Generated by tpd {} for session {:?}: an override for your compose files.",
        tpd_wire::VERSION,
        req.session
    );
    let _ = writeln!(w, "# Use it after them:  docker compose -f docker-compose.yml -f THIS_FILE up");
    let _ = writeln!(w, "# (docker-compose v1 takes the same flags). It changes only what is below:");
    let _ = writeln!(w, "#");
    let _ = writeln!(
        w,
        "# - {} run(s) in the network namespace of tpd's sidecar container {:?}",
        chosen.join(", "),
        req.sidecar
    );
    let _ = writeln!(w, "#   (network_mode: container:...): they reach cluster services by name (svc, svc.ns,");
    let _ = writeln!(w, "#   svc.ns.svc.cluster.local) through the session's tunnel, and each other on localhost.");
    for s in req.swapped {
        let _ = writeln!(
            w,
            "# - {} replaces {} in the cluster: the traffic the cluster sends it arrives here,",
            s.service, s.deployment
        );
        let _ = writeln!(
            w,
            "#   with the remote container's env (your own `environment`/`env_file` keys win) and volumes."
        );
    }
    let _ = writeln!(w, "# - The project's default network is the session's network {:?} (external: tpd", req.network);
    let _ = writeln!(w, "#   created it and removes it with the session); the other services reach the services");
    let _ = writeln!(w, "#   above through the sidecar, which `external_links` names after them.");
    let _ = writeln!(w, "# - A container in another's network namespace cannot publish ports: the sidecar owns the");
    let _ = writeln!(w, "#   published ports of its namespace.");
    if !moved.is_empty() {
        let _ = writeln!(w, "#   Moved off your services (`ports: !reset []`), publish them on the sidecar instead:");
        for m in moved {
            let _ =
                writeln!(w, "#     {}: {}  ->  tpd connect --name {} -p {}", m.service, m.spec, req.session, m.spec);
        }
    }
    if !req.swapped.is_empty() {
        let _ =
            writeln!(w, "# - The env below holds the remote pod's values, which may include secrets: keep this file");
        let _ = writeln!(w, "#   out of version control, and regenerate it when the Deployment's env changes.");
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB_API_DB: &str = "version: '3.8'\nservices:\n  web:\n    image: web\n    ports: ['8000:80']\n    depends_on: [api]\n  \
        api:\n    image: api\n    expose: ['8080']\n    environment: {LOG_LEVEL: debug}\n    depends_on: [db]\n  \
        db:\n    image: db\n    networks: [back]\n  worker:\n    image: w\n    ports: ['9000:9000']\n  \
        cache:\n    image: c\n    network_mode: host\n  tagged:\n    image: t\n    networks: [back]\n  \
        same:\n    image: s\n    expose: ['8080']\n  listed:\n    image: l\n    networks: [default]\nnetworks:\n  back: {}\n";

    fn project() -> Project {
        Project::parse(WEB_API_DB).unwrap()
    }

    fn swap(service: &str) -> Swapped {
        Swapped {
            service: service.into(),
            deployment: format!("deployment/{service}"),
            env: [("DB_URL", "postgres://db"), ("LOG_LEVEL", "info"), ("PRICE", "$5")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mounts: vec![Mount { source: "/tmp/tpd/s/vol/config".into(), target: "/etc/app".into(), read_only: true }],
            local_ports: vec![8080],
        }
    }

    fn run(flavor: Flavor, swapped: &[Swapped], outbound: &[&str]) -> Result<Generated, GenerateError> {
        let project = project();
        let outbound: Vec<String> = outbound.iter().map(|s| s.to_string()).collect();
        generate(&Request {
            project: &project,
            session: "dev",
            sidecar: "tpd-dev",
            network: "tpd-dev",
            flavor,
            swapped,
            outbound: &outbound,
        })
    }

    fn doc(g: &Generated) -> Value {
        serde_yaml_ng::from_str(&g.yaml).unwrap()
    }

    #[test]
    fn swapped_service_joins_the_sidecar_with_the_remote_env_and_volumes() {
        let g = run(Flavor::V2, &[swap("api")], &[]).unwrap();
        let d = doc(&g);
        let api = &d["services"]["api"];
        assert!(g.yaml.contains("expose: !reset []"), "docker refuses exposed ports in a shared namespace");
        assert_eq!(api["network_mode"], "container:tpd-dev");
        assert_eq!(api["environment"]["DB_URL"], "postgres://db");
        assert_eq!(api["environment"]["PRICE"], "$$5", "compose would interpolate a bare $");
        assert!(api["environment"].get("LOG_LEVEL").is_none(), "the user's own key wins");
        assert_eq!(api["volumes"][0], "/tmp/tpd/s/vol/config:/etc/app:ro,rslave");
        assert_eq!(d["version"], "3.8");
        assert_eq!(d["networks"]["default"]["name"], "tpd-dev");
        assert_eq!(d["networks"]["default"]["external"], true);
        assert!(g.moved_ports.is_empty());
    }

    #[test]
    fn others_on_the_default_network_name_the_sidecar_after_the_chosen_services() {
        let d = doc(&run(Flavor::V2, &[swap("api")], &["worker"]).unwrap());
        assert_eq!(d["services"]["web"]["external_links"], Value::from(vec!["tpd-dev:api", "tpd-dev:worker"]));
        assert!(d["services"]["same"].get("external_links").is_some());
        // db and tagged live on their own network; cache on the host's.
        for untouched in ["db", "tagged", "cache"] {
            assert!(d["services"].get(untouched).is_none(), "{untouched} must not be touched");
        }
    }

    #[test]
    fn v2_lists_the_default_network_for_every_service() {
        let d = doc(&run(Flavor::V2, &[], &["listed"]).unwrap());
        assert_eq!(d["services"]["listed"]["network_mode"], "container:tpd-dev");
    }

    #[test]
    fn outbound_only_gets_the_namespace_and_no_env() {
        let d = doc(&run(Flavor::V2, &[], &["worker"]).unwrap());
        let worker = &d["services"]["worker"];
        assert_eq!(worker["network_mode"], "container:tpd-dev");
        assert!(worker.get("environment").is_none() && worker.get("volumes").is_none());
    }

    #[test]
    fn ports_move_to_the_sidecar_with_a_note_under_v2() {
        let g = run(Flavor::V2, &[], &["worker"]).unwrap();
        assert_eq!(g.moved_ports, vec![MovedPort { service: "worker".into(), spec: "9000:9000".into() }]);
        assert!(g.yaml.contains("ports: !reset []"), "{}", g.yaml);
        assert!(g.yaml.contains("#     worker: 9000:9000  ->  tpd connect --name dev -p 9000:9000"), "{}", g.yaml);
        assert!(g.yaml.contains("the sidecar owns the\n#   published ports"), "{}", g.yaml);
    }

    #[test]
    fn the_header_explains_itself_and_stays_a_comment() {
        let g = run(Flavor::V2, &[swap("api")], &[]).unwrap();
        let header: Vec<&str> = g.yaml.lines().take_while(|l| l.starts_with('#')).collect();
        assert!(header.len() > 8);
        assert!(header.iter().any(|l| l.contains("api replaces deployment/api")));
        assert!(header.iter().any(|l| l.contains("secrets")));
        assert!(g.yaml.lines().skip(header.len()).all(|l| !l.starts_with('#')));
    }

    #[test]
    fn bad_choices_are_refused_with_a_fix() {
        let cases: Vec<(Flavor, Vec<Swapped>, Vec<&str>, GenerateError)> = vec![
            (
                Flavor::V1,
                vec![swap("nope")],
                vec![],
                GenerateError::UnknownService {
                    service: "nope".into(),
                    known: ["api", "cache", "db", "listed", "same", "tagged", "web", "worker"]
                        .map(String::from)
                        .to_vec(),
                },
            ),
            (
                Flavor::V1,
                vec![],
                vec!["cache"],
                GenerateError::NetworkModeTaken { service: "cache".into(), mode: "host".into() },
            ),
            (
                Flavor::V1,
                vec![],
                vec!["tagged"],
                GenerateError::OwnNetworks { service: "tagged".into(), networks: "back".into() },
            ),
            (
                Flavor::V1,
                vec![],
                vec!["listed"],
                GenerateError::OwnNetworks { service: "listed".into(), networks: "default".into() },
            ),
            (Flavor::V2, vec![swap("api")], vec!["api"], GenerateError::ChosenTwice { service: "api".into() }),
            (
                Flavor::V2,
                vec![swap("api")],
                vec!["same"],
                GenerateError::PortClash { port: 8080, proto: "tcp", first: "api".into(), second: "same".into() },
            ),
            (
                Flavor::V1,
                vec![],
                vec!["worker"],
                GenerateError::PortsNeedV2 { service: "worker".into(), ports: "9000:9000".into() },
            ),
            (
                Flavor::V1,
                vec![swap("api")],
                vec![],
                GenerateError::PortsNeedV2 { service: "api".into(), ports: "expose 8080".into() },
            ),
        ];
        for (flavor, swapped, outbound, want) in cases {
            let got = run(flavor, &swapped, &outbound).unwrap_err();
            assert_eq!(got, want);
            assert!(!got.help().is_empty());
        }
    }
}
