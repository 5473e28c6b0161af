//! Intercept planning, with no IO: from a Deployment and the Services of
//! its namespace, the Deployment whose pods run tpd's intercept agent
//! beside the real container, the Services pointed at the agent's ports,
//! and the [`Record`] that undoes both; and from the current objects plus
//! that record, the originals again.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, PodSecurityContext, PodSpec, ResourceRequirements, Service,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tpd_wire::files::VolumeMount;
use tpd_wire::intercept::{self, AGENT_CONTAINER, Config, PortMap};
use tpd_wire::names::agent_env;
use tpd_wire::neighbours::Declared;

use super::record::{ANNOTATION, ENTRY_PREFIX, Entry, OriginalTarget, RECORD_VERSION, Record};
use crate::error::Hint;
use crate::swap::identity::agent_security_context;
use crate::swap::plan::{self as swap_plan, Target, agent_env_of, choose_container, name_of, ready_when_listening};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Target(#[from] swap_plan::Error),
    #[error(
        "container {container:?} of deployment/{deployment} does not declare TCP port {port} (it declares: {})",
        if .declared.is_empty() { "none".to_owned() } else { .declared.join(", ") }
    )]
    NotDeclared { deployment: String, container: String, port: u16, declared: Vec<String> },
    #[error("deployment/{0} selects its pods with no matchLabels, which tpd needs to find them")]
    NoSelector(String),
    #[error("deployment/{0} declares so many ports that none is left for tpd's intercept agent")]
    NoFreePorts(String),
    #[error("deployment/{deployment} is intercepted on its container {intercepted:?}, not {wanted:?}")]
    OtherContainer { deployment: String, intercepted: String, wanted: String },
    #[error(
        "deployment/{deployment} is intercepted on port(s) {} only, and port {port} would need its agents set up again",
        .intercepted.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
    )]
    PortNotIntercepted { deployment: String, port: u16, intercepted: Vec<u16> },
}

impl Error {
    /// What the user can do about it, in one line.
    pub fn help(&self) -> String {
        match self {
            Error::Target(_) => "`kubectl get deployment -o yaml` shows its containers".into(),
            Error::NotDeclared { .. } => "intercept one of the ports it declares: --port REMOTE:LOCAL".into(),
            Error::NoSelector(_) => "intercept a Deployment whose selector has matchLabels, or use --swap".into(),
            Error::NoFreePorts(_) => "use --swap for this Deployment".into(),
            Error::OtherContainer { deployment, intercepted, .. } => {
                format!("intercept deployment/{deployment}:{intercepted}, or wait until its intercepts end")
            }
            Error::PortNotIntercepted { intercepted, .. } => format!(
                "intercept port {} as the other sessions do, or wait until every intercept of it ends",
                intercepted.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first port the agent may take; it takes the lowest free ones above.
pub const FIRST_AGENT_PORT: u16 = 7700;

/// A planned first intercept of a Deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The Deployment with the agent added and the record annotated.
    pub deployment: Deployment,
    pub record: Record,
    /// The Services whose ports change, as they will be.
    pub services: Vec<Service>,
}

/// Plans the first intercept of `original`'s `container` (chosen as a swap
/// chooses it) on its `remotes` ports, among the namespace's `services`.
pub fn plan(
    original: &Deployment,
    services: &[Service],
    container: Option<&str>,
    agent_image: &str,
    remotes: &[u16],
) -> Result<Planned> {
    let index = choose_container(original, container)?;
    let name = name_of(original);
    let pod = pod_spec(original).ok_or_else(|| swap_plan::Error::NoContainers(name.clone()))?;
    let real = &pod.containers[index];
    check_declared(&name, real, remotes)?;
    let picked = pick_ports(pod, 2 + remotes.len());
    let [transport, intercept, listen @ ..] = picked.as_slice() else {
        return Err(Error::NoFreePorts(name));
    };
    if listen.len() != remotes.len() {
        return Err(Error::NoFreePorts(name));
    }
    let ports = remotes.iter().zip(listen).map(|(&remote, &listen)| PortMap { remote, listen }).collect();
    let config = Config { transport: *transport, intercept: *intercept, ports };
    let mounts = swap_plan::served_mounts(Some(pod), real);

    let labels = pod_labels(original);
    let mut retargeted = Vec::new();
    let mut originals = BTreeMap::new();
    for svc in services.iter().filter(|s| selects(s, &labels)) {
        if let Some((changed, was)) = retarget(svc, real, remotes) {
            originals.insert(svc.metadata.name.clone().unwrap_or_default(), was);
            retargeted.push(changed);
        }
    }
    let record = Record { version: RECORD_VERSION, container: real.name.clone(), config, services: originals };

    let mut deployment = original.clone();
    if let Some(pod) = deployment.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        let agent = agent_container(real, pod.security_context.as_ref(), agent_image, (&record.config, &mounts));
        pod.containers.push(agent);
    }
    deployment.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(ANNOTATION.into(), record.to_annotation());
    Ok(Planned { deployment, record, services: retargeted })
}

/// Whether a session may join the intercept `record` describes: the same
/// container, and ports its agents already stand in for. (A new port would
/// mean a new rollout under the other sessions; it is refused instead.)
pub fn joinable(deployment: &str, record: &Record, container: &str, remotes: &[u16]) -> Result<()> {
    if record.container != container {
        return Err(Error::OtherContainer {
            deployment: deployment.to_owned(),
            intercepted: record.container.clone(),
            wanted: container.to_owned(),
        });
    }
    let intercepted = record.remotes();
    match remotes.iter().find(|r| !intercepted.contains(r)) {
        Some(&port) => Err(Error::PortNotIntercepted { deployment: deployment.to_owned(), port, intercepted }),
        None => Ok(()),
    }
}

/// The refusal of `mine` when a live session already takes the same
/// requests (an equal filter on one of the same ports): the agents could
/// not tell the two apart. Copies clash with nothing: every mirroring
/// session gets its own.
pub fn clash(target: &Target, live: &[Entry], mine: &Entry) -> Option<Hint> {
    let takes = |e: &&Entry| e.mirror.is_none() && mine.mirror.is_none() && e.filter == mine.filter;
    live.iter().filter(|e| e.session != mine.session).filter(takes).find_map(|e| {
        let port = mine.ports.iter().find(|p| e.ports.contains(p))?;
        let since = e.since.0.strftime("%H:%M UTC");
        Some(Hint::new(
            format!("{target} port {port} {} is intercepted by {} since {since}", mine.filter, e.holder),
            "pick another --header value, or wait for that session to end",
        ))
    })
}

/// Fails unless `real` declares every one of `remotes` as a TCP port.
pub fn check_declared(deployment: &str, real: &Container, remotes: &[u16]) -> Result<()> {
    let declared = real.ports.iter().flatten();
    let tcp = |p: &&ContainerPort| p.protocol.as_deref().unwrap_or("TCP") == "TCP";
    match remotes.iter().find(|&&r| !declared.clone().filter(tcp).any(|p| p.container_port == i32::from(r))) {
        None => Ok(()),
        Some(&port) => Err(Error::NotDeclared {
            deployment: deployment.to_owned(),
            container: real.name.clone(),
            port,
            declared: declared.map(describe_port).collect(),
        }),
    }
}

/// `8080/TCP (http)`.
fn describe_port(p: &ContainerPort) -> String {
    let proto = p.protocol.as_deref().unwrap_or("TCP");
    match &p.name {
        Some(name) => format!("{}/{proto} ({name})", p.container_port),
        None => format!("{}/{proto}", p.container_port),
    }
}

/// The `n` lowest ports from [`FIRST_AGENT_PORT`] that no container or
/// init container of `pod` declares (fewer when the range runs out).
pub fn pick_ports(pod: &PodSpec, n: usize) -> Vec<u16> {
    let all = pod.containers.iter().chain(pod.init_containers.iter().flatten());
    let taken: Vec<i32> = all.flat_map(|c| c.ports.iter().flatten()).map(|p| p.container_port).collect();
    (FIRST_AGENT_PORT..=u16::MAX).filter(|p| !taken.contains(&i32::from(*p))).take(n).collect()
}

/// The agent beside `real` (in a pod with `pod_sc`): its image, `real`'s
/// env and volumes (which it serves to the session), its own named ports,
/// and `real`'s identity, as a swap's agent has
/// (`swap::identity::agent_security_context`): the session reads and writes
/// the volumes as the app does, and the agent never has more privilege
/// than `real` (so any Pod Security level that admits the app admits it).
pub fn agent_container(
    real: &Container,
    pod_sc: Option<&PodSecurityContext>,
    agent_image: &str,
    (config, mounts): (&Config, &[VolumeMount]),
) -> Container {
    let json = serde_json::to_string(config).unwrap_or_default();
    let ours = [(agent_env::MOUNTS, tpd_wire::files::mounts_env_value(mounts)), (agent_env::INTERCEPT, json)];
    let port = |name: String, number: u16| ContainerPort {
        name: Some(name),
        container_port: number.into(),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let mut ports = vec![
        port(intercept::TRANSPORT_PORT_NAME.into(), config.transport),
        port(intercept::INTERCEPT_PORT_NAME.into(), config.intercept),
    ];
    ports.extend(config.ports.iter().map(|p| port(intercept::listen_port_name(p.remote), p.listen)));
    let requests =
        BTreeMap::from([("cpu".to_owned(), Quantity("10m".into())), ("memory".to_owned(), Quantity("32Mi".into()))]);
    Container {
        name: AGENT_CONTAINER.into(),
        image: Some(agent_image.to_owned()),
        image_pull_policy: Some("IfNotPresent".into()),
        env: Some(agent_env_of(real, ours)),
        env_from: real.env_from.clone(),
        ports: Some(ports),
        volume_mounts: real.volume_mounts.clone(),
        readiness_probe: Some(ready_when_listening(config.transport)),
        resources: Some(ResourceRequirements { requests: Some(requests), ..Default::default() }),
        security_context: Some(agent_security_context(pod_sc, real.security_context.as_ref())),
        ..Default::default()
    }
}

/// Whether `svc` sends traffic to pods labelled `labels` (a Service
/// without a selector selects nothing).
pub fn selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    let selector = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty());
    selector.is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// `svc` with each TCP port that reaches one of `remotes` of `real` (by
/// number, by `real`'s port name, or with no targetPort by its own number)
/// pointed at the agent's stand-in port, and what each was; `None` when no
/// port reaches an intercepted one.
pub fn retarget(svc: &Service, real: &Container, remotes: &[u16]) -> Option<(Service, Vec<OriginalTarget>)> {
    let mut changed = svc.clone();
    let ports = changed.spec.as_mut()?.ports.as_mut()?;
    let mut was = Vec::new();
    for (index, port) in ports.iter_mut().enumerate() {
        if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        let Some(remote) = resolve(port.target_port.as_ref(), port.port, real).filter(|r| remotes.contains(r)) else {
            continue;
        };
        was.push(OriginalTarget { index, name: port.name.clone(), target_port: port.target_port.clone(), remote });
        port.target_port = Some(IntOrString::String(intercept::listen_port_name(remote)));
    }
    (!was.is_empty()).then_some((changed, was))
}

/// The container port a Service port's targetPort reaches in `real`.
fn resolve(target: Option<&IntOrString>, port: i32, real: &Container) -> Option<u16> {
    let number = match target {
        None => port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            real.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name.as_str()))?.container_port
        }
    };
    u16::try_from(number).ok()
}

/// `current` with the agent and every intercept annotation removed; what
/// others changed meanwhile stays.
pub fn restore_deployment(current: &Deployment) -> Deployment {
    let mut restored = current.clone();
    if let Some(pod) = restored.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        pod.containers.retain(|c| c.name != AGENT_CONTAINER);
    }
    if let Some(annotations) = restored.metadata.annotations.as_mut() {
        annotations.retain(|k, _| k != ANNOTATION && !k.starts_with(ENTRY_PREFIX));
        if annotations.is_empty() {
            restored.metadata.annotations = None;
        }
    }
    restored
}

/// `current` with the ports the intercept retargeted pointed back where
/// they were: each found by name (else by place) and only while it still
/// targets the agent (a port someone changed since is theirs).
pub fn restore_service(current: &Service, originals: &[OriginalTarget]) -> Service {
    let mut restored = current.clone();
    let Some(ports) = restored.spec.as_mut().and_then(|s| s.ports.as_mut()) else {
        return restored;
    };
    for o in originals {
        let at = match &o.name {
            Some(name) => ports.iter().position(|p| p.name.as_ref() == Some(name)),
            None => Some(o.index).filter(|&i| i < ports.len()),
        };
        let ours = Some(IntOrString::String(intercept::listen_port_name(o.remote)));
        if let Some(port) = at.map(|i| &mut ports[i]).filter(|p| p.target_port == ours) {
            port.target_port = o.target_port.clone();
        }
    }
    restored
}

/// The label selector of the Deployment's pods (`app=api,tier=web`), from
/// its `matchLabels`.
pub fn selector(d: &Deployment) -> Result<String> {
    let labels = d.spec.as_ref().and_then(|s| s.selector.match_labels.as_ref()).filter(|l| !l.is_empty());
    let labels = labels.ok_or_else(|| Error::NoSelector(name_of(d)))?;
    Ok(labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

/// What the session serves and reaches of `container`'s pod: its volumes
/// (as a swap serves them) and its neighbours' ports (the pod's other
/// containers but the agent, less `container`'s own ports).
pub fn served(d: &Deployment, container: &str) -> (Vec<VolumeMount>, Vec<Declared>) {
    let original = restore_deployment(d);
    let Some(pod) = pod_spec(&original) else {
        return Default::default();
    };
    let Some(index) = pod.containers.iter().position(|c| c.name == container) else {
        return Default::default();
    };
    let real = &pod.containers[index];
    let own: Vec<u16> = real.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok()).collect();
    (swap_plan::served_mounts(Some(pod), real), swap_plan::neighbour_ports(pod, index, &own))
}

/// The container named `name` in `d`'s pod template.
pub fn container<'a>(d: &'a Deployment, name: &str) -> Option<&'a Container> {
    pod_spec(d)?.containers.iter().find(|c| c.name == name)
}

fn pod_spec(d: &Deployment) -> Option<&PodSpec> {
    d.spec.as_ref()?.template.spec.as_ref().filter(|p| !p.containers.is_empty())
}

fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    let meta = d.spec.as_ref().and_then(|s| s.template.metadata.as_ref());
    meta.and_then(|m| m.labels.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests;
