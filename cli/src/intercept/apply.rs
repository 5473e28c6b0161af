//! The kube-rs side of an intercept: check, add the agent and roll it out,
//! point the Services at it, and add and renew the session's entry (`end`
//! removes it and, after the last session, puts the Services and the
//! Deployment back). Every decision is made by `plan` and `record`.
//!
//! Order matters for the requests in flight: the Services are pointed at
//! the agent only once every pod has it (so no request meets a pod without
//! the agent's port), and are pointed back before the agent is removed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tokio::sync::watch;
use tpd_wire::files::VolumeMount;
use tpd_wire::intercept::{AGENT_CONTAINER, Filter, Mirror, Route, Traffic};
use tpd_wire::neighbours::Declared;

use super::plan;
use super::record::{Entry, Record, Renewing};
use crate::cluster::Cluster;
use crate::error::Hint;
use crate::output::progress;
use crate::rollout::{admit_agent_pod, conflict, get, replica_failure, rolled_out};
use crate::swap::lease::{self, Leased};
use crate::swap::plan::{Target, annotation_pointer, choose_container, guarded_diff, name_of};

/// What a session intercepts, as it asks for it.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub target: &'a Target,
    pub filter: &'a Filter,
    /// `--mirror`: copies, not the requests.
    pub mirror: Option<Mirror>,
    /// The real container's ports (the REMOTE of each `--port`).
    pub remotes: &'a [u16],
    pub agent_image: &'a str,
    pub session: &'a str,
    pub holder: &'a str,
}

/// A session's intercept once the agents run and the Services target them:
/// what the registrar, the relay and the sidecar need.
#[derive(Debug, Clone)]
pub struct Intercept {
    pub target: Target,
    /// The real container, which keeps serving what the session does not take.
    pub container: String,
    /// The label selector of the workload's pods (`app=api`): every one of
    /// them runs an agent the session registers with.
    pub selector: String,
    /// What the session registers with every agent.
    pub routes: Vec<Route>,
    /// The session's secret for registrations and relays; never logged.
    pub token: Token,
    /// `user@host`, and since when (RFC 3339), as registrations carry them.
    pub holder: String,
    pub since: String,
    /// The real container's volumes, which the session mounts.
    pub mounts: Vec<VolumeMount>,
    /// The pod's other containers' ports, reached on 127.0.0.1.
    pub neighbours: Vec<Declared>,
    /// The Deployment as intercepted; its pod template names the session's
    /// hostname, DNS and hosts.
    pub deployment: Deployment,
    /// What the agents say the session got; the registrar writes it, each
    /// renewal of the session's entry reads it.
    pub traffic: Arc<watch::Sender<Traffic>>,
}

/// A random 128-bit secret in hex; its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn random() -> Self {
        Token(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// How often a patch is planned again after the object changed under it.
pub(super) const ATTEMPTS: u32 = 3;

/// Checks, before anything changes, that `target` can be intercepted on
/// `remotes` with `filter`: its container, its ports (those the agents
/// already stand in for, when others intercept it), pods to intercept, not
/// swapped, no live session taking the same requests.
pub async fn check(
    cluster: &Cluster,
    target: &Target,
    remotes: &[u16],
    filter: &Filter,
    mirror: Option<Mirror>,
) -> anyhow::Result<()> {
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let d = get(&api, &cluster.namespace, &target.name).await?;
    refuse_swapped(&d, target)?;
    let now = Timestamp::now();
    let asked = Entry::new("", "", now, remotes, filter).mirroring(mirror);
    if let Some(refusal) = plan::clash(target, &live_entries(&d, now, Grace::None), &asked) {
        return Err(refusal.into());
    }
    let hint = |e: plan::Error| Hint::new(e.to_string(), e.help());
    let index = choose_container(&d, target.container.as_deref()).map_err(|e| hint(e.into()))?;
    let pod = d.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    if let Some(real) = pod.and_then(|p| p.containers.get(index)) {
        plan::check_declared(&target.name, real, remotes).map_err(hint)?;
        if let Some(record) = Record::read(&d)? {
            plan::joinable(&target.name, &record, &real.name, remotes).map_err(hint)?;
        }
    }
    plan::selector(&d).map_err(hint)?;
    if d.spec.as_ref().and_then(|s| s.replicas) == Some(0) {
        return Err(Hint::new(
            format!("{target} has 0 replicas: no pod serves the requests to intercept"),
            format!("scale it up first (`kubectl scale {target} --replicas=1 -n {}`)", cluster.namespace),
        )
        .into());
    }
    Ok(())
}

/// A session's entry, added to the intercepted Deployment.
#[derive(Debug, Clone)]
pub struct Added {
    /// The intercept's record, as the entry was added under it.
    pub record: Record,
    /// The session's entry, whose lease the session renews from now on.
    pub entry: Entry,
    /// What the agents say the session got, for each renewal of the entry.
    pub traffic: Arc<watch::Sender<Traffic>>,
}

impl Added {
    /// The entry as its renewals write it.
    pub fn renewing(&self) -> Renewing {
        Renewing { entry: self.entry.clone(), traffic: self.traffic.subscribe() }
    }
}

/// Adds the session to the intercept of `req.target`: the first session
/// adds the agent to the pod template (one rollout begins) with its entry,
/// a later one its entry only. Refuses, changing nothing, a swapped
/// Deployment and requests a live session already takes.
pub async fn add(cluster: &Cluster, req: &Request<'_>) -> anyhow::Result<Added> {
    let (ns, target) = (&cluster.namespace, req.target);
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), ns);
    let entry = Entry::new(req.session, req.holder, Timestamp::now(), req.remotes, req.filter).mirroring(req.mirror);
    for attempt in 1..=ATTEMPTS {
        let current = get(&api, ns, &target.name).await?;
        refuse_swapped(&current, target)?;
        if let Some(refusal) = plan::clash(target, &live_entries(&current, Timestamp::now(), Grace::None), &entry) {
            return Err(refusal.into());
        }
        let (patch, record) = match Record::read(&current)? {
            None => {
                let all = services.list(&ListParams::default()).await.context("cannot list the Services")?.items;
                let planned = plan::plan(&current, &all, target.container.as_deref(), req.agent_image, req.remotes)
                    .map_err(|e| Hint::new(e.to_string(), e.help()))?;
                let mut to = planned.deployment;
                to.metadata.annotations.get_or_insert_default().insert(entry.key(), entry.to_annotation());
                if attempt == 1 {
                    let help = format!(
                        "nothing was changed. The intercept agent runs as Pod Security's `restricted` profile asks; \
                         a new pod of {target} would be refused as well: make the Deployment comply"
                    );
                    admit_agent_pod(&api, ns, target, &to, help).await?;
                }
                let generation = current.metadata.generation.map(serde_json::Value::from);
                (guarded_diff(&current, &to, ("/metadata/generation".into(), generation)), planned.record)
            }
            Some(record) => {
                let wanted = choose_container(&current, target.container.as_deref())
                    .ok()
                    .and_then(|i| current.spec.as_ref()?.template.spec.as_ref()?.containers.get(i))
                    .map_or_else(|| record.container.clone(), |c| c.name.clone());
                plan::joinable(&target.name, &record, &wanted, req.remotes)
                    .map_err(|e| Hint::new(e.to_string(), e.help()))?;
                progress(&format!("{target} is already intercepted by other sessions; adding this one"));
                (join_patch(&record, &entry), record)
            }
        };
        match api.patch(&target.name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
            Ok(_) => {
                let traffic = Arc::new(watch::Sender::new(Traffic::default()));
                return Ok(Added { record, entry, traffic });
            }
            Err(e) if conflict(&e) => tracing::debug!(attempt, "{target} changed while tpd was intercepting it: {e}"),
            Err(e) => return Err(anyhow::Error::from(e).context(format!("cannot intercept {target}"))),
        }
    }
    Err(Hint::new(
        format!("{target} changed {ATTEMPTS} times while tpd was intercepting it"),
        "wait for whatever is changing it (a rollout, an operator) to finish, then run the command again",
    )
    .into())
}

/// Waits until every pod of `target` runs a ready agent, then points the
/// Services at the agents; returns the session's intercept and one of
/// those pods. Every session points the Services (it changes nothing when
/// done), so a first session that died between its rollout and this step
/// is made good. Interrupting it is safe: the session's cleanup removes its
/// entry and restores what it started.
pub async fn ready(
    cluster: &Cluster,
    target: &Target,
    added: Added,
    timeout: Duration,
) -> anyhow::Result<(Intercept, String)> {
    let ns = &cluster.namespace;
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let hint = |e: plan::Error| Hint::new(e.to_string(), e.help());
    let selector = plan::selector(&get(&api, ns, &target.name).await?).map_err(hint)?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let home = wait_for_agents(&api, &pods, &target.name, &selector, timeout).await?;
    let current = get(&api, ns, &target.name).await?;
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), ns);
    retarget_services(&services, &current, &added.record).await?;
    let (mounts, neighbours) = plan::served(&current, &added.record.container);
    let Added { record, entry, traffic } = added;
    let intercept = Intercept {
        target: target.clone(),
        container: record.container,
        selector,
        routes: entry.routes(),
        token: Token::random(),
        since: entry.since.0.to_string(),
        holder: entry.holder,
        mounts,
        neighbours,
        deployment: current,
        traffic,
    };
    Ok((intercept, home))
}

/// Adds the session's entry, if the record is still the one read.
fn join_patch(record: &Record, entry: &Entry) -> json_patch::Patch {
    let ops = serde_json::json!([
        { "op": "test", "path": annotation_pointer(super::record::ANNOTATION), "value": record.to_annotation() },
        { "op": "add", "path": annotation_pointer(&entry.key()), "value": entry.to_annotation() },
    ]);
    serde_json::from_value(ops).unwrap_or_default()
}

/// A swapped Deployment's real container is not running: nothing to intercept.
fn refuse_swapped(d: &Deployment, target: &Target) -> anyhow::Result<()> {
    match crate::swap::record::Record::read(d)? {
        Some(swap) => Err(Hint::new(
            format!("{target} is swapped by {} since {}: its real container is not running", swap.holder, swap.since.0),
            "wait for that session to end (`tpd status` shows it), then intercept it",
        )
        .into()),
        None => Ok(()),
    }
}

/// How long past its lease an entry still counts as a live session's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grace {
    /// Not at all: what a session decides on (whether its filter is taken,
    /// whether it is the last), as the agents forget a route at its lease.
    None,
    /// The grace a swap's repair waits for: what another machine's repair
    /// decides on, so a session whose renewal is merely late keeps its entry.
    Repair,
    /// No session counts: `tpd restore` ends every intercept by hand.
    Nobody,
}

/// The entries whose sessions are taken to be alive.
pub(super) fn live_entries(d: &Deployment, now: Timestamp, grace: Grace) -> Vec<Entry> {
    let live = |e: &Entry| match grace {
        Grace::None => e.expires() > now,
        Grace::Repair => !lease::past_grace(e.expires(), now),
        Grace::Nobody => false,
    };
    Entry::all(d).into_iter().filter(live).collect()
}

/// The refusal of a swap of an intercepted Deployment, naming who
/// intercepts it; `None` when it is not intercepted.
pub fn swap_refusal(d: &Deployment, target: &Target) -> Option<Hint> {
    Record::read(d).ok().flatten()?;
    let holders: Vec<String> = live_entries(d, Timestamp::now(), Grace::Repair)
        .iter()
        .map(|e| format!("{} ({})", e.holder, e.describe()))
        .collect();
    let who = if holders.is_empty() { "sessions that stopped renewing".to_owned() } else { holders.join(", ") };
    Some(Hint::new(
        format!("{target} is intercepted by {who}: a swap would take all of its traffic from them"),
        "wait for those sessions to end, or take your requests only: --intercept with --header, --baggage or --path-prefix",
    ))
}

/// Waits until every pod of the Deployment runs a ready agent (the rollout
/// finished), saying how far it got; returns one of those pods.
async fn wait_for_agents(
    api: &Api<Deployment>,
    pods: &Api<Pod>,
    name: &str,
    selector: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let d = api.get(name).await.with_context(|| format!("cannot read deployment/{name}"))?;
        if let Some(why) = replica_failure(&d) {
            return Err(Hint::new(
                format!("the cluster refuses to create pods of deployment/{name} with the intercept agent: {why}"),
                format!("see `kubectl describe replicaset -l {selector}`"),
            )
            .into());
        }
        let list = pods.list(&ListParams::default().labels(selector)).await.context("cannot list the pods")?.items;
        let live = list.iter().filter(|p| p.metadata.deletion_timestamp.is_none());
        if let Some(image) = live.clone().find_map(agent_cannot_pull) {
            return Err(Hint::new(
                format!("the cluster cannot pull the agent image {image}"),
                "push it to a registry the cluster pulls from and pass --agent-image",
            )
            .into());
        }
        let mut ready: Vec<String> = live.filter(|p| agent_ready(p)).filter_map(|p| p.metadata.name.clone()).collect();
        ready.sort();
        let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let line = format!("rolling out the intercept agent: {}/{want} pods", ready.len().min(want as usize));
        if line != last {
            progress(&line);
            last = line;
        }
        if rolled_out(&d)
            && let Some(home) = ready.into_iter().next()
        {
            return Ok(home);
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "the intercept agent was not ready in every pod of deployment/{name} after {} s ({last})",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn agent_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|c| c.name == AGENT_CONTAINER)
}

fn agent_ready(pod: &Pod) -> bool {
    agent_status(pod).is_some_and(|c| c.ready)
}

/// The agent's image, when the kubelet cannot pull it.
fn agent_cannot_pull(pod: &Pod) -> Option<String> {
    let status = agent_status(pod)?;
    let reason = status.state.as_ref()?.waiting.as_ref()?.reason.as_deref()?;
    crate::rollout::is_pull_failure(reason).then(|| status.image.clone())
}

/// Points the record's Services at the agents (each patch guarded by the
/// Service's resourceVersion, read again on a conflict).
pub(super) async fn retarget_services(api: &Api<Service>, d: &Deployment, record: &Record) -> anyhow::Result<()> {
    let Some(real) = plan::container(d, &record.container) else {
        anyhow::bail!("deployment/{} has no container {:?} any more", name_of(d), record.container);
    };
    let remotes = record.remotes();
    for name in record.services.keys() {
        patch_service(api, name, |svc| plan::retarget(svc, real, &remotes).map(|(s, _)| s)).await?;
    }
    Ok(())
}

/// Puts the record's Services back as they were.
pub(super) async fn restore_services(api: &Api<Service>, record: &Record) -> anyhow::Result<()> {
    for (name, originals) in &record.services {
        patch_service(api, name, |svc| Some(plan::restore_service(svc, originals))).await?;
    }
    Ok(())
}

/// Patches Service `name` to what `change` makes of it (nothing when it
/// returns `None` or the same), guarded by its resourceVersion; a Service
/// that is gone is left gone.
async fn patch_service(
    api: &Api<Service>,
    name: &str,
    change: impl Fn(&Service) -> Option<Service>,
) -> anyhow::Result<()> {
    for attempt in 1..=ATTEMPTS {
        let Some(current) = api.get_opt(name).await.with_context(|| format!("cannot read service/{name}"))? else {
            return Ok(());
        };
        let Some(to) = change(&current).filter(|to| *to != current) else {
            return Ok(());
        };
        let version = current.metadata.resource_version.clone().map(serde_json::Value::String);
        let patch = guarded_diff(&current, &to, ("/metadata/resourceVersion".into(), version));
        match api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
            Ok(_) => return Ok(()),
            Err(e) if conflict(&e) => tracing::debug!(attempt, "service/{name} changed meanwhile: {e}"),
            Err(e) => return Err(anyhow::Error::from(e).context(format!("cannot change service/{name}"))),
        }
    }
    anyhow::bail!("service/{name} changed {ATTEMPTS} times while tpd was changing it")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::record::renewed_ago as entry;
    use tpd_wire::intercept;

    #[test]
    fn a_swap_of_an_intercepted_deployment_names_who_intercepts_it() {
        let now = Timestamp::now();
        let record = Record {
            version: 1,
            container: "api".into(),
            config: intercept::Config { transport: 7700, intercept: 7701, ports: vec![] },
            services: Default::default(),
        };
        let alice = entry("alice", 1, now);
        let mut d = Deployment::default();
        d.metadata.annotations = Some(
            [
                (super::super::record::ANNOTATION.to_owned(), record.to_annotation()),
                (alice.key(), alice.to_annotation()),
            ]
            .into(),
        );
        let target: Target = "deployment/api".parse().unwrap();
        let hint = swap_refusal(&d, &target).expect("refused");
        assert_eq!(
            hint.message,
            "deployment/api is intercepted by alice@laptop (requests with x-dev=alice): a swap would take all of its traffic from them"
        );
        assert!(swap_refusal(&Deployment::default(), &target).is_none());
    }

    #[test]
    fn a_later_session_adds_only_its_own_entry_while_the_record_holds() {
        let record = Record {
            version: 1,
            container: "api".into(),
            config: intercept::Config { transport: 7700, intercept: 7701, ports: vec![] },
            services: Default::default(),
        };
        let e = entry("bob", 0, Timestamp::now());
        let ops = serde_json::to_value(join_patch(&record, &e)).unwrap();
        assert_eq!(ops[0]["op"], "test");
        assert_eq!(ops[0]["path"], "/metadata/annotations/tpd.dev~1intercept");
        assert_eq!(ops[1]["op"], "add");
        assert_eq!(ops[1]["path"], "/metadata/annotations/tpd.dev~1intercept.bob");
        assert_eq!(ops.as_array().unwrap().len(), 2);
    }

    #[test]
    fn the_token_is_random_and_never_shown() {
        let (a, b) = (Token::random(), Token::random());
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 32);
        assert!(a.expose().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(format!("{a:?}"), "Token(..)");
    }
}
