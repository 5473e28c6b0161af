//! The kube-rs side of an intercept: check, add the agent and roll it out,
//! point the Services at it, add and renew the session's entry, and at the
//! end remove the entry and, after the last session, put the Services and
//! the Deployment back. Every decision is made by `plan` and `record`.
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
use tpd_wire::intercept::{self, AGENT_CONTAINER, Filter, Mirror, Route, Traffic};
use tpd_wire::neighbours::Declared;

use super::plan;
use super::record::{Entry, Record, Renewing, entry_key};
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
const ATTEMPTS: u32 = 3;

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
enum Grace {
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
fn live_entries(d: &Deployment, now: Timestamp, grace: Grace) -> Vec<Entry> {
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
async fn retarget_services(api: &Api<Service>, d: &Deployment, record: &Record) -> anyhow::Result<()> {
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
async fn restore_services(api: &Api<Service>, record: &Record) -> anyhow::Result<()> {
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

/// How ending a session's intercept went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The Deployment is not intercepted (any more).
    NotIntercepted,
    /// The session's entry is gone; other sessions still intercept it.
    Left,
    /// It was the last: the Services and the Deployment are as before.
    Restored,
}

/// Ends `session`'s intercept of deployment/`name`: removes its entry and,
/// when no live session is left, restores. Other sessions that stopped
/// renewing (a laptop that vanished moments ago) are waited out, at most a
/// lease, so the last live session leaves nothing behind.
pub async fn end(client: &kube::Client, namespace: &str, name: &str, session: &str) -> anyhow::Result<Ended> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let Some(current) = api.get_opt(name).await? else {
        return Ok(Ended::NotIntercepted);
    };
    if Record::read(&current)?.is_none() {
        return Ok(Ended::NotIntercepted);
    }
    let had_entry = remove_own_entry(&api, name, session).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    if restore_if_unused(&api, &services, name, Grace::None).await? {
        return Ok(Ended::Restored);
    }
    // Once at most: those sessions' leases end within a renewal period.
    let Some(current) = api.get_opt(name).await? else {
        return Ok(Ended::NotIntercepted);
    };
    if let Some(until) = stale_until(&live_entries(&current, Timestamp::now(), Grace::None), Timestamp::now()) {
        let wait = Duration::try_from(until.duration_since(Timestamp::now())).unwrap_or_default();
        tracing::info!("waiting {wait:?} for the lease of intercept sessions that stopped renewing");
        tokio::time::sleep(wait + Duration::from_millis(500)).await;
        if restore_if_unused(&api, &services, name, Grace::None).await? {
            return Ok(Ended::Restored);
        }
    }
    Ok(if had_entry { Ended::Left } else { Ended::NotIntercepted })
}

/// When every one of the `live` entries has missed two renewals (one
/// merely late, behind a slow API server, is still renewing): when the
/// last of them runs out, within one renewal period. `None` if one of them
/// is renewing.
fn stale_until(live: &[Entry], now: Timestamp) -> Option<Timestamp> {
    let renewing = intercept::LEASE.saturating_sub(intercept::RENEW_EVERY * 2);
    let renewing = k8s_openapi::jiff::SignedDuration::try_from(renewing).ok()?;
    let stale = |e: &Entry| e.expires() < now + renewing;
    if live.is_empty() || !live.iter().all(stale) {
        return None;
    }
    live.iter().map(Entry::expires).max()
}

/// What became of a session's entry.
enum Removed {
    Yes,
    Absent,
    /// It changed since it was read: renewed (its session lives) or
    /// removed by someone else.
    Changed,
}

/// Removes `session`'s entry as `d` shows it, guarded by its value.
async fn remove_entry_as_read(api: &Api<Deployment>, d: &Deployment, session: &str) -> anyhow::Result<Removed> {
    let key = entry_key(session);
    let Some(value) = d.metadata.annotations.as_ref().and_then(|a| a.get(&key)) else {
        return Ok(Removed::Absent);
    };
    let name = d.metadata.name.clone().unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": annotation_pointer(&key), "value": value },
        { "op": "remove", "path": annotation_pointer(&key) },
    ]))?;
    match api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
        Ok(_) => Ok(Removed::Yes),
        Err(e) if conflict(&e) => Ok(Removed::Changed),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot remove the intercept of deployment/{name}"))),
    }
}

/// Removes the ending `session`'s own entry from deployment/`name`,
/// reading it again when its last renewal landed meanwhile; returns
/// whether it had one.
async fn remove_own_entry(api: &Api<Deployment>, name: &str, session: &str) -> anyhow::Result<bool> {
    for attempt in 1..=ATTEMPTS {
        let Some(current) = api.get_opt(name).await? else {
            return Ok(false);
        };
        match remove_entry_as_read(api, &current, session).await? {
            Removed::Yes => return Ok(true),
            Removed::Absent => return Ok(attempt > 1),
            Removed::Changed => tracing::debug!(attempt, "the session's intercept entry changed while tpd removed it"),
        }
    }
    anyhow::bail!("the intercept entry of session {session} changed {ATTEMPTS} times while tpd removed it")
}

/// Restores deployment/`name` when it is intercepted and no live session is
/// left: the Services first, then the Deployment, guarded by its
/// annotations (a session that joined meanwhile keeps the intercept, and
/// the Services are pointed at its agents again). Returns whether it did.
async fn restore_if_unused(
    api: &Api<Deployment>,
    services: &Api<Service>,
    name: &str,
    grace: Grace,
) -> anyhow::Result<bool> {
    for attempt in 1..=ATTEMPTS {
        let Some(current) = api.get_opt(name).await? else {
            return Ok(false);
        };
        let Some(record) = Record::read(&current)? else {
            return Ok(false);
        };
        if !live_entries(&current, Timestamp::now(), grace).is_empty() {
            if attempt > 1 {
                retarget_services(services, &current, &record).await?;
            }
            return Ok(false);
        }
        restore_services(services, &record).await?;
        let restored = plan::restore_deployment(&current);
        let annotations = serde_json::to_value(&current.metadata.annotations).ok();
        let patch = guarded_diff(&current, &restored, ("/metadata/annotations".into(), annotations));
        match api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
            Ok(_) => return Ok(true),
            Err(e) if conflict(&e) => tracing::debug!(attempt, "deployment/{name} changed while tpd restored it: {e}"),
            Err(e) => return Err(anyhow::Error::from(e).context(format!("cannot restore deployment/{name}"))),
        }
    }
    anyhow::bail!("deployment/{name} changed {ATTEMPTS} times while tpd was restoring it; run the command again")
}

/// `tpd restore`: puts an intercepted Deployment back whoever intercepts
/// it (their sessions end at their next renewal); returns the sessions'
/// holders, or `None` when it is not intercepted.
pub async fn restore_by_hand(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<Vec<String>>> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let Some(current) = api.get_opt(name).await? else {
        return Ok(None);
    };
    if Record::read(&current)?.is_none() {
        return Ok(None);
    }
    let holders = Entry::all(&current).into_iter().map(|e| format!("{} ({})", e.holder, e.describe())).collect();
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    restore_if_unused(&api, &services, name, Grace::Nobody).await?;
    Ok(Some(holders))
}

/// The repair of an intercepted Deployment whose sessions stopped renewing:
/// their entries go, and with the last one the intercept. Says what it did;
/// returns whether it restored the Deployment.
pub async fn repair(client: &kube::Client, d: &Deployment) -> anyhow::Result<bool> {
    if !matches!(Record::read(d), Ok(Some(_))) {
        return Ok(false);
    }
    let ns = d.metadata.namespace.clone().unwrap_or_default();
    let name = d.metadata.name.clone().unwrap_or_default();
    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let now = Timestamp::now();
    for gone in Entry::all(d).iter().filter(|e| lease::past_grace(e.expires(), now)) {
        // Renewed meanwhile: its session is back, and keeps its entry.
        if !matches!(remove_entry_as_read(&api, d, &gone.session).await?, Removed::Yes) {
            continue;
        }
        eprintln!(
            "tpd: ended the intercept of deployment/{name} in {ns} by {} ({}): its session stopped renewing its lease at {}",
            gone.holder, gone.filter, gone.renew_time.0
        );
    }
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let restored = restore_if_unused(&api, &services, &name, Grace::Repair).await?;
    if restored {
        eprintln!("tpd: restored deployment/{name} in {ns}: none of its intercepts is left");
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn entry(session: &str, renewed_secs_ago: i64, now: Timestamp) -> Entry {
        let filter =
            Filter { headers: [("x-dev".into(), session.into())].into(), path_prefix: None, ..Filter::default() };
        let at = now - SignedDuration::from_secs(renewed_secs_ago);
        Entry::new(session, &format!("{session}@laptop"), at, &[8080], &filter)
    }

    #[test]
    fn the_last_session_waits_out_only_sessions_that_missed_a_renewal() {
        let now: Timestamp = "2026-12-07T10:02:00Z".parse().unwrap();
        // (seconds since each other session renewed, what to wait for)
        let table: [(&[i64], Option<i64>); 6] = [
            (&[], None),          // nobody else: restore at once
            (&[1], None),         // renewing: it keeps the intercept
            (&[7], None),         // a renewal late behind a slow API server: still renewing
            (&[11], Some(4)),     // missed two renewals: its lease ends in 4 s
            (&[11, 14], Some(4)), // the later of the two
            (&[11, 2], None),     // one of them is renewing
        ];
        for (ago, want) in table {
            let live: Vec<Entry> = ago.iter().enumerate().map(|(i, s)| entry(&format!("s{i}"), *s, now)).collect();
            let got = stale_until(&live, now).map(|t| t.duration_since(now).as_secs());
            assert_eq!(got, want, "{ago:?}");
        }
    }

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
