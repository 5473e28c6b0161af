//! Swap planning, with no IO: from the Deployment as the API server returned
//! it, the Deployment whose pod runs the tpd agent instead of the chosen
//! container, and from a swapped Deployment plus its record, the original.
//! Both directions are plain functions over k8s-openapi types; `patch_between`
//! turns either result into the JSON patch that `apply` sends.

use std::collections::BTreeMap;
use std::str::FromStr;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStrategy};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSecurityContext, PodSpec, Probe, TCPSocketAction};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tpd_wire::files::VolumeMount;
use tpd_wire::names::{self, agent_env};
use tpd_wire::neighbours::{Declared, PodPort, Protocol};

use super::identity::agent_security_context;
use super::record::{Original, Record};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} does not name a Deployment; write deployment/NAME or deployment/NAME:CONTAINER")]
    BadTarget(String),
    #[error("deployment/{deployment} has no container named {wanted:?} (it has: {})", .have.join(", "))]
    NoSuchContainer { deployment: String, wanted: String, have: Vec<String> },
    #[error(
        "deployment/{deployment} has {} containers ({}) and none is named like the Deployment; \
         pick one with deployment/{deployment}:CONTAINER", .have.len(), .have.join(", ")
    )]
    Ambiguous { deployment: String, have: Vec<String> },
    #[error("deployment/{0} has no pod template with containers")]
    NoContainers(String),
    #[error("container {container:?} uses port {port}, which the tpd agent needs for its tunnel")]
    PortClash { container: String, port: u16 },
    #[error(
        "deployment/{0} has no container named {1:?} any more; restore it by hand from its tpd.dev/swap annotation"
    )]
    ContainerGone(String, String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What `--swap` names: `deployment/NAME` or `deployment/NAME:CONTAINER`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Target {
    pub name: String,
    pub container: Option<String>,
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadTarget(s.to_owned());
        let (kind, rest) = s.split_once('/').ok_or_else(bad)?;
        if !matches!(kind, "deployment" | "deployments" | "deploy" | "deployment.apps" | "deployments.apps") {
            return Err(bad());
        }
        let (name, container) = match rest.split_once(':') {
            Some((name, container)) if !container.is_empty() => (name, Some(container.to_owned())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        if name.is_empty() || name.contains('/') {
            return Err(bad());
        }
        Ok(Target { name: name.to_owned(), container })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "deployment/{}", self.name)
    }
}

/// Everything about the session that the swapped Deployment carries.
#[derive(Debug, Clone)]
pub struct Params {
    pub agent_image: String,
    pub session: String,
    /// `user@host`, shown to anyone the swap is refused to.
    pub holder: String,
    pub now: k8s_openapi::jiff::Timestamp,
    pub lease_seconds: i64,
    /// Remote ports from `--port REMOTE:LOCAL` the container does not declare.
    pub extra_ports: Vec<u16>,
}

/// A planned swap: the Deployment to write and what the session needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct Swap {
    pub deployment: Deployment,
    pub record: Record,
    /// The ports the agent listens on for cluster traffic.
    pub ports: Vec<u16>,
    /// The volume mounts the agent serves, in the order given to it.
    pub mounts: Vec<VolumeMount>,
    /// The ports the pod's other containers declare, which the developer's
    /// container reaches on 127.0.0.1 (less the swapped container's own).
    pub neighbours: Vec<Declared>,
}

/// Picks the container to swap (or intercept): the one asked for, else the
/// only one, else the one named like the Deployment; tpd's own intercept
/// agent, beside the app in an intercepted Deployment, is never picked.
pub fn choose_container(deployment: &Deployment, wanted: Option<&str>) -> Result<usize> {
    let name = name_of(deployment);
    let containers = containers(deployment).ok_or_else(|| Error::NoContainers(name.clone()))?;
    let apps: Vec<(usize, &Container)> =
        containers.iter().enumerate().filter(|(_, c)| c.name != tpd_wire::intercept::AGENT_CONTAINER).collect();
    let have = || apps.iter().map(|(_, c)| c.name.clone()).collect::<Vec<_>>();
    let found = match wanted {
        Some(w) => apps.iter().find(|(_, c)| c.name == w).ok_or_else(|| Error::NoSuchContainer {
            deployment: name.clone(),
            wanted: w.to_owned(),
            have: have(),
        })?,
        None if apps.len() == 1 => &apps[0],
        None => apps
            .iter()
            .find(|(_, c)| c.name == name)
            .ok_or_else(|| Error::Ambiguous { deployment: name.clone(), have: have() })?,
    };
    Ok(found.0)
}

/// Computes the swapped Deployment and its record from the original.
pub fn plan(original: &Deployment, container: Option<&str>, p: &Params) -> Result<Swap> {
    let index = choose_container(original, container)?;
    let spec = original.spec.as_ref();
    let template = spec.and_then(|s| s.template.spec.as_ref());
    let orig = template.map(|t| &t.containers[index]).ok_or_else(|| Error::NoContainers(name_of(original)))?;

    let ports = agent_ports(orig, &p.extra_ports)?;
    let mounts = served_mounts(template, orig);
    let neighbours = template.map(|t| neighbour_ports(t, index, &ports)).unwrap_or_default();
    let original_fields = Original {
        container: orig.clone(),
        replicas: spec.and_then(|s| s.replicas),
        strategy: spec.and_then(|s| s.strategy.clone()),
        pod_labels: spec.and_then(|s| s.template.metadata.as_ref()).and_then(|m| m.labels.clone()),
    };
    let record = Record::new(&p.session, &p.holder, p.now, p.lease_seconds, original_fields);

    let mut swapped = original.clone();
    let spec = swapped.spec.get_or_insert_with(Default::default);
    // One agent pod: inbound traffic must reach one session, and the old pod
    // must be gone before the agent takes its ports (no surge).
    spec.replicas = Some(1);
    spec.strategy = Some(DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None });
    let meta = spec.template.metadata.get_or_insert_with(Default::default);
    meta.labels.get_or_insert_with(BTreeMap::new).insert(names::LABEL_SESSION.into(), p.session.clone());
    if let Some(pod) = spec.template.spec.as_mut() {
        let pod_sc = template.and_then(|t| t.security_context.as_ref());
        pod.containers[index] = agent_container(orig, pod_sc, p, &ports, &mounts);
    }
    swapped
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(names::ANNOTATION_SWAP.into(), record.to_annotation());
    Ok(Swap { deployment: swapped, record, ports, mounts, neighbours })
}

/// The Deployment with the record's original fields put back and the record
/// removed; everything else (including changes others made meanwhile) stays.
pub fn restore(current: &Deployment, record: &Record) -> Result<Deployment> {
    let name = name_of(current);
    let orig = &record.original;
    let mut restored = current.clone();
    let spec = restored.spec.get_or_insert_with(Default::default);
    spec.replicas = orig.replicas;
    spec.strategy = orig.strategy.clone();
    if let Some(meta) = spec.template.metadata.as_mut() {
        meta.labels = orig.pod_labels.clone();
    }
    let slot = spec
        .template
        .spec
        .as_mut()
        .and_then(|pod| pod.containers.iter_mut().find(|c| c.name == orig.container.name))
        .ok_or_else(|| Error::ContainerGone(name.clone(), orig.container.name.clone()))?;
    *slot = orig.container.clone();
    if let Some(annotations) = restored.metadata.annotations.as_mut() {
        annotations.remove(names::ANNOTATION_SWAP);
        if annotations.is_empty() {
            restored.metadata.annotations = None;
        }
    }
    Ok(restored)
}

/// The JSON patch that turns `from` into `to`, guarded by `guard`: a `test`
/// operation on a value that must still hold when the API server applies it
/// (so a concurrent change makes the patch fail instead of being overwritten).
pub fn patch_between(from: &Deployment, to: &Deployment, guard: Guard) -> json_patch::Patch {
    let test = match guard {
        Guard::Generation => ("/metadata/generation".to_owned(), from.metadata.generation.map(serde_json::Value::from)),
        Guard::Record => (
            annotation_pointer(names::ANNOTATION_SWAP),
            from.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(names::ANNOTATION_SWAP).cloned())
                .map(serde_json::Value::String),
        ),
    };
    guarded_diff(from, to, test)
}

/// The JSON patch from `from` to `to` (any two objects of one kind), led by
/// a `test` that `pointer` still holds `value` when the value is known.
pub fn guarded_diff<T: serde::Serialize>(
    from: &T,
    to: &T,
    (pointer, value): (String, Option<serde_json::Value>),
) -> json_patch::Patch {
    let from_json = serde_json::to_value(from).unwrap_or_default();
    let to_json = serde_json::to_value(to).unwrap_or_default();
    let mut ops = Vec::new();
    if let Some(value) = value {
        ops.push(json_patch::PatchOperation::Test(json_patch::TestOperation {
            path: pointer.parse().unwrap_or_default(),
            value,
        }));
    }
    ops.extend(json_patch::diff(&from_json, &to_json).0);
    json_patch::Patch(ops)
}

/// What a patch checks before it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Nobody changed the Deployment's spec since we read it (for the
    /// swap). Not its resourceVersion: the controllers write status and the
    /// revision annotation at any time, most of all just after a restore,
    /// and those writes do not touch what the swap records.
    Generation,
    /// The swap record is still the one we read (for restore and renewal).
    Record,
}

/// JSON pointer to the annotation `key` (`/` escaped as `~1`).
pub fn annotation_pointer(key: &str) -> String {
    format!("/metadata/annotations/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// The agent in place of `orig`, in a pod with `pod_sc` (also the
/// outbound-only agent pod's container); it runs as `orig` did.
pub fn agent_container(
    orig: &Container,
    pod_sc: Option<&PodSecurityContext>,
    p: &Params,
    ports: &[u16],
    mounts: &[VolumeMount],
) -> Container {
    let ours = [
        (agent_env::PORTS, ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")),
        (agent_env::SESSION, p.session.clone()),
        (agent_env::MOUNTS, tpd_wire::files::mounts_env_value(mounts)),
    ];
    // The agent reads an empty port list as one empty port: no ports, no variable.
    let ours = ours.into_iter().filter(|(name, value)| *name != agent_env::PORTS || !value.is_empty());
    Container {
        name: orig.name.clone(),
        image: Some(p.agent_image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        env: Some(agent_env_of(orig, ours)),
        env_from: orig.env_from.clone(),
        ports: orig.ports.clone(),
        resources: orig.resources.clone(),
        volume_mounts: orig.volume_mounts.clone(),
        volume_devices: orig.volume_devices.clone(),
        working_dir: orig.working_dir.clone(),
        termination_message_path: orig.termination_message_path.clone(),
        termination_message_policy: orig.termination_message_policy.clone(),
        // The app's probes would fail against the agent; ready means the
        // tunnel port accepts connections.
        readiness_probe: Some(ready_when_listening(names::AGENT_TRANSPORT_PORT)),
        security_context: Some(agent_security_context(pod_sc, orig.security_context.as_ref())),
        ..Default::default()
    }
}

/// `orig`'s env without any variable of tpd's agent, then `ours`: what an
/// agent that serves `orig`'s volumes and environment is given.
pub fn agent_env_of(orig: &Container, ours: impl IntoIterator<Item = (&'static str, String)>) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> =
        orig.env.iter().flatten().filter(|e| !agent_env::ALL.contains(&e.name.as_str())).cloned().collect();
    env.extend(ours.into_iter().map(|(name, value)| EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }));
    env
}

/// An agent is ready once its tunnel's port accepts connections.
pub fn ready_when_listening(port: u16) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(port.into()), host: None }),
        period_seconds: Some(1),
        ..Default::default()
    }
}

/// The container's declared ports plus the extra ones, sorted, deduplicated.
fn agent_ports(c: &Container, extra: &[u16]) -> Result<Vec<u16>> {
    let declared = c.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok());
    let mut ports: Vec<u16> = declared.chain(extra.iter().copied()).collect();
    ports.sort_unstable();
    ports.dedup();
    match ports.iter().find(|&&p| p == names::AGENT_TRANSPORT_PORT) {
        Some(&port) => Err(Error::PortClash { container: c.name.clone(), port }),
        None => Ok(ports),
    }
}

/// The TCP and UDP ports the pod's other containers declare (and its
/// sidecar-style init containers, `restartPolicy: Always`, which run beside
/// the app), each with the container that declares it; not the ports the
/// swapped container (index `swapped`) has, which stay the developer's.
pub fn neighbour_ports(pod: &PodSpec, swapped: usize, own: &[u16]) -> Vec<Declared> {
    let others = pod.containers.iter().enumerate().filter(|&(i, _)| i != swapped).map(|(_, c)| c);
    let sidecars = pod.init_containers.iter().flatten().filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let mut declared: Vec<Declared> = Vec::new();
    for c in others.chain(sidecars) {
        for p in c.ports.iter().flatten() {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => continue, // SCTP: not carried by the tunnel
            };
            let Some(port) = u16::try_from(p.container_port).ok().filter(|n| *n != 0 && !own.contains(n)) else {
                continue;
            };
            let port = PodPort { port, protocol };
            if !declared.iter().any(|d| d.port == port) {
                declared.push(Declared { port, owner: format!("container {}", c.name) });
            }
        }
    }
    declared
}

/// Where Kubernetes mounts a pod's service-account token and CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What the agent serves: the container's volumeMounts, plus the
/// service-account token and CA, which admission adds to the running pod
/// (not to the Deployment's template), so that local code can use its
/// in-cluster config; not when the pod opts out or the container mounts
/// something there itself.
pub fn served_mounts(pod: Option<&PodSpec>, c: &Container) -> Vec<VolumeMount> {
    let mut mounts = volume_mounts(c);
    let automount = pod.and_then(|p| p.automount_service_account_token) != Some(false);
    if automount && !mounts.iter().any(|m| m.mount_path.trim_end_matches('/') == SERVICE_ACCOUNT_DIR) {
        mounts.push(VolumeMount {
            name: "kube-api-access".into(),
            mount_path: SERVICE_ACCOUNT_DIR.into(),
            read_only: true,
            sub_path: None,
        });
    }
    mounts
}

fn volume_mounts(c: &Container) -> Vec<VolumeMount> {
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| VolumeMount {
            name: m.name.clone(),
            mount_path: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
            sub_path: m.sub_path.clone(),
        })
        .collect()
}

pub fn containers(d: &Deployment) -> Option<&Vec<Container>> {
    d.spec.as_ref()?.template.spec.as_ref().map(|p| &p.containers).filter(|c| !c.is_empty())
}

pub fn name_of(d: &Deployment) -> String {
    d.metadata.name.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests;
