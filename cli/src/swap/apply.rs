//! The kube-rs side of a swap: read the Deployment, check the lease, send
//! the planned patch, wait for the agent pod, renew, restore, and repair
//! swaps whose session vanished. Every decision is made by the pure modules.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tpd_wire::names;

use super::lease::{self, Claim, Leased};
use super::plan::{self, Guard, Params, Swap, Target, name_of};
use super::record::Record;
use crate::cluster::Cluster;
use crate::error::Hint;
use crate::output::progress;
use crate::rollout::{admit_agent_pod, conflict, get, is_ready, replica_failure, rolled_out};

/// Checks, before anything changes, that `target` names a Deployment in
/// the cluster's namespace and one of its containers unambiguously;
/// returns the Deployment as read, for the swap's first attempt.
pub async fn check_target(cluster: &Cluster, target: &Target) -> anyhow::Result<Deployment> {
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let d = get(&api, &cluster.namespace, &target.name).await?;
    if let Some(refusal) = crate::intercept::apply::swap_refusal(&d, target) {
        return Err(refusal.into());
    }
    plan::choose_container(&d, target.container.as_deref()).map_err(|e| {
        Hint::new(
            e.to_string(),
            format!("`kubectl get deployment/{} -n {} -o yaml` shows its containers", target.name, cluster.namespace),
        )
    })?;
    Ok(d)
}

/// How many times a swap is planned again when the Deployment's spec
/// changed between reading and patching it (a `kubectl scale`, a rollout
/// someone started) before tpd gives up and says so.
const SWAP_ATTEMPTS: u32 = 3;

/// Swaps `target` for the agent: refuses a live holder, restores an
/// abandoned swap first, warns about GitOps controllers, then patches. A
/// spec changed meanwhile means reading and planning again. `read` is the
/// Deployment as the caller just read it (saving the first attempt a round
/// trip): the patch's generation guard refuses it if it changed since,
/// and the next attempt reads it again.
pub async fn swap(
    api: &Api<Deployment>,
    namespace: &str,
    target: &Target,
    params: &Params,
    force: bool,
    mut read: Option<Deployment>,
) -> anyhow::Result<Swap> {
    for attempt in 1..=SWAP_ATTEMPTS {
        let current = claim(api, namespace, target, force, read.take()).await?;
        let swap = plan::plan(&current, target.container.as_deref(), params)?;
        if attempt == 1 {
            let help = format!(
                "nothing was changed. The agent runs as the container it replaces, so the namespace's Pod Security \
                 would refuse a new pod of {target} as well; make the Deployment comply, or swap it in another namespace"
            );
            admit_agent_pod(api, namespace, target, &swap.deployment, help).await?;
        }
        let patch = plan::patch_between(&current, &swap.deployment, Guard::Generation);
        match api.patch(&target.name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
            Ok(_) => {
                if let Some(warning) = super::gitops::warning(&current) {
                    crate::output::warning(&warning);
                }
                return Ok(swap);
            }
            Err(e) if conflict(&e) => tracing::debug!(attempt, "{target} changed while tpd was swapping it: {e}"),
            Err(e) => return Err(anyhow::Error::from(e).context(format!("cannot swap {target}"))),
        }
    }
    Err(Hint::new(
        format!("{target} changed {SWAP_ATTEMPTS} times while tpd was swapping it"),
        "wait for whatever is changing it (a rollout, an operator) to finish, then run the command again",
    )
    .into())
}

/// Reads `target` (unless `read` is given) and makes sure tpd may swap it:
/// free, or abandoned (then restored first), or held by someone else (an
/// error naming them).
async fn claim(
    api: &Api<Deployment>,
    namespace: &str,
    target: &Target,
    force: bool,
    read: Option<Deployment>,
) -> anyhow::Result<Deployment> {
    let current = match read {
        Some(d) => d,
        None => get(api, namespace, &target.name).await?,
    };
    if let Some(refusal) = crate::intercept::apply::swap_refusal(&current, target) {
        return Err(refusal.into());
    }
    match lease::claim(Record::read(&current)?.as_ref(), force, Timestamp::now()) {
        Claim::Free => Ok(current),
        Claim::Held { holder, since, expired } => {
            let help = if expired {
                format!(
                    "its lease expired; take it over with `tpd run --force ...`, or restore it with `tpd restore {target}`"
                )
            } else {
                format!(
                    "wait for that session to end, or ask {holder} to stop it (`tpd restore {target}` ends it by force)"
                )
            };
            Err(Hint::new(format!("{target} is swapped by {holder} since {since}"), help).into())
        }
        Claim::Abandoned(record) => {
            progress(&format!(
                "{target} was left swapped by {} (its session stopped renewing); restoring it first",
                record.holder
            ));
            restore_record(api, &current, &record).await?;
            get(api, namespace, &target.name).await
        }
    }
}

/// How a restore went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// Put back what the session of `holder` had swapped.
    Done {
        holder: String,
    },
    NotSwapped,
    /// Another session took the Deployment over; it is theirs to restore.
    TakenOver {
        holder: String,
    },
}

/// Restores `name` if it is swapped (by `session`, when given).
pub async fn restore(
    api: &Api<Deployment>,
    namespace: &str,
    name: &str,
    session: Option<&str>,
) -> anyhow::Result<Restored> {
    let current = get(api, namespace, name).await?;
    let Some(record) = Record::read(&current)? else {
        return Ok(Restored::NotSwapped);
    };
    if session.is_some_and(|s| s != record.session) {
        return Ok(Restored::TakenOver { holder: record.holder });
    }
    restore_record(api, &current, &record).await?;
    Ok(Restored::Done { holder: record.holder })
}

/// Puts the Deployment back, then deletes the session's other cluster
/// objects (its UDP transport's Service): a session restored from elsewhere
/// leaves nothing behind either.
async fn restore_record(api: &Api<Deployment>, current: &Deployment, record: &Record) -> anyhow::Result<()> {
    let name = current.metadata.name.clone().unwrap_or_default();
    let restored = plan::restore(current, record)?;
    let patch = plan::patch_between(current, &restored, Guard::Record);
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .with_context(|| format!("cannot restore deployment/{name}"))?;
    let namespace = current.metadata.namespace.clone().unwrap_or_default();
    if let Err(e) = delete_cluster_objects(&api.clone().into_client(), &namespace, &record.session).await {
        eprintln!(
            "tpd: restored deployment/{name}, but could not delete the other objects of its session {}: {e:#}",
            record.session
        );
    }
    Ok(())
}

/// Renews the lease; fails if the record is no longer ours.
pub async fn renew<L: Leased>(api: &Api<Deployment>, name: &str, record: &L) -> Result<L, RenewError> {
    let renewed = record.renewed(Timestamp::now());
    let pointer = plan::annotation_pointer(&record.key());
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        { "op": "test", "path": pointer, "value": record.to_annotation() },
        { "op": "replace", "path": pointer, "value": renewed.to_annotation() },
    ]))
    .map_err(|e| RenewError::Lost(format!("cannot build the renewal: {e}")))?;
    match api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch)).await {
        Ok(_) => Ok(renewed),
        // The test op failed (someone restored or took the record), or the Deployment is gone.
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 404 | 409 | 422) => Err(RenewError::Lost(match s.code {
            404 => format!("deployment/{name} was deleted"),
            _ => format!("deployment/{name} was restored or taken over by someone else"),
        })),
        Err(e) => Err(RenewError::Unreachable(crate::cluster::describe(&e))),
    }
}

/// Why a lease renewal failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The swap record is no longer this session's: the session is over.
    #[error("{0}")]
    Lost(String),
    /// The API server did not answer (a stall, a network blip): the record
    /// may still be ours, so the renewal is tried again.
    #[error("the API server did not take the renewal: {0}")]
    Unreachable(String),
}

/// Waits until the session's agent pod is Running and Ready, printing each
/// change of state; fails early on states that will not fix themselves.
/// `swapped` is the Deployment whose pod it is, if any: a pod its
/// ReplicaSet cannot create (Pod Security, a quota) is said at once.
///
/// The pods are watched; the Deployment's `ReplicaFailure` is not a pod
/// event, so it is read again each second while there is no pod (on the
/// second's tick only: read on every event, it held the watch's next event
/// back by a round trip to the API server).
pub async fn wait_for_agent(
    pods: &Api<Pod>,
    swapped: Option<(&Api<Deployment>, &str)>,
    session: &str,
    image: &str,
    timeout: Duration,
) -> anyhow::Result<Pod> {
    let selector = format!("{}={session}", names::LABEL_SESSION);
    let (reader, writer) = reflector::store();
    let watch = reflector(writer, watcher(pods.clone(), watcher::Config::default().labels(&selector)));
    let mut events = std::pin::pin!(watch.default_backoff());
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let ticked = tokio::select! {
            event = events.next() => match event {
                // The watch retries with backoff; the timeout below bounds it.
                Some(Err(e)) => { tracing::debug!("watching the agent's pod: {e}"); false }
                Some(Ok(_)) => false,
                None => anyhow::bail!("the watch of the agent's pod ended"),
            },
            _ = tick.tick() => true,
        };
        let pod = reader.state().into_iter().find(|p| p.metadata.deletion_timestamp.is_none());
        if ticked
            && pod.is_none()
            && let Some((api, name)) = swapped
            && let Some(why) = api.get_opt(name).await.ok().flatten().as_ref().and_then(replica_failure)
        {
            return Err(Hint::new(
                format!("the cluster refuses to create the agent pod: {why}"),
                format!(
                    "the agent runs with the identity of the container it replaces; see `kubectl -n {} describe replicaset -l {}={session}`",
                    pods.namespace().unwrap_or("default"),
                    names::LABEL_SESSION
                ),
            )
            .into());
        }
        let state = pod.as_deref().map(pod_state).unwrap_or_else(|| "waiting for the agent pod to be created".into());
        if state != last {
            progress(&format!("{state} ({:.1} s)", started.elapsed().as_secs_f64()));
            last.clone_from(&state);
        }
        if let Some(pod) = pod {
            agent_is_coming(&pod, &state, pods.namespace().unwrap_or("default"), image)?;
            if is_ready(&pod) {
                return Ok(Pod::clone(&pod));
            }
        }
        if started.elapsed() > timeout {
            anyhow::bail!("the agent pod was not ready after {} s (last state: {last})", timeout.as_secs());
        }
    }
}

/// Fails on the states of the agent's pod that waiting does not fix: an
/// image the cluster cannot pull, an agent that exited or keeps crashing.
fn agent_is_coming(pod: &Pod, state: &str, namespace: &str, image: &str) -> anyhow::Result<()> {
    if cannot_pull(pod) {
        return Err(Hint::new(
            format!("the cluster cannot pull the agent image {image}"),
            "push it to a registry the cluster pulls from and pass --agent-image (the sandbox cluster uses the local images: `cargo xtask images`)",
        )
        .into());
    }
    if agent_gave_up(pod) {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        return Err(Hint::new(
            format!("the agent pod failed ({state})"),
            format!("its log says why: kubectl logs -n {namespace} pod/{name}"),
        )
        .into());
    }
    Ok(())
}

/// Waits for a Deployment's rollout to finish (all replicas updated and
/// available), watching it rather than polling.
pub async fn wait_for_rollout(api: &Api<Deployment>, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let done =
        kube::runtime::wait::await_condition(api.clone(), name, |d: Option<&Deployment>| d.is_some_and(rolled_out));
    match tokio::time::timeout(timeout, done).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("cannot watch deployment/{name}"))),
        Err(_) => anyhow::bail!("deployment/{name} did not finish rolling out within {} s", timeout.as_secs()),
    }
}

/// Deletes what `session` created in the cluster besides the swap: the
/// outbound-only agent pod and the UDP transport's NodePort Service, found
/// by their session label. The session's own cleanup runs it, and so does
/// every restore of its swap from elsewhere (`tpd restore`, the repair of
/// an expired lease, a takeover).
pub async fn delete_cluster_objects(client: &kube::Client, namespace: &str, session: &str) -> anyhow::Result<()> {
    let selector = ListParams::default().labels(&format!("{}={session}", names::LABEL_SESSION));
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    // Pods of the swapped Deployment carry the label too; its ReplicaSet
    // owns them, so only delete pods nobody owns (the outbound-only agent).
    for pod in pods.list(&selector).await?.items {
        if pod.metadata.owner_references.as_ref().is_none_or(Vec::is_empty) {
            let name = pod.metadata.name.unwrap_or_default();
            pods.delete(&name, &DeleteParams::default()).await?;
            tracing::info!("deleted pod/{name}");
        }
    }
    for svc in services.list(&selector).await?.items {
        let name = svc.metadata.name.unwrap_or_default();
        services.delete(&name, &DeleteParams::default()).await?;
        tracing::info!("deleted service/{name}");
    }
    Ok(())
}

/// "pod NAME: Running, ready" / "pod NAME: Pending (ErrImagePull: ...)".
/// The pod ended (`Failed`, or `Succeeded`: the agent never exits on its
/// own) or its container keeps crashing.
fn agent_gave_up(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let ended = matches!(status.and_then(|s| s.phase.as_deref()), Some("Failed" | "Succeeded"));
    ended || waiting_reasons(pod).any(|r| r == "CrashLoopBackOff")
}

/// Whether the kubelet cannot pull the pod's image: waiting will not help.
fn cannot_pull(pod: &Pod) -> bool {
    waiting_reasons(pod).any(crate::rollout::is_pull_failure)
}

/// Why the pod's containers wait, as the kubelet says it (`ErrImagePull`,
/// `CrashLoopBackOff`, ...).
fn waiting_reasons(pod: &Pod) -> impl Iterator<Item = &str> {
    let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
    statuses.into_iter().flatten().filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
}

fn pod_state(pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    match (waiting_reasons(pod).next(), is_ready(pod)) {
        (_, true) => format!("agent pod {name}: Running, ready"),
        (Some(reason), _) => format!("agent pod {name}: {phase} ({reason})"),
        (None, _) => format!("agent pod {name}: {phase}"),
    }
}

/// Restores every swap in `namespace` (or all namespaces) whose session
/// stopped renewing, and every intercept whose sessions all did (dropping
/// the entries of those that did), and says so. Every command that talks to the cluster
/// calls this, so a laptop that vanished mid-session leaves nothing behind
/// for long.
pub async fn repair_abandoned(client: &kube::Client, namespace: Option<&str>) -> anyhow::Result<Vec<String>> {
    let api: Api<Deployment> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let now = Timestamp::now();
    let mut repaired = Vec::new();
    for d in api.list(&ListParams::default()).await.context("cannot list deployments")?.items {
        if crate::intercept::end::repair(client, &d).await? {
            repaired.push(format!("{}/{}", d.metadata.namespace.as_deref().unwrap_or_default(), name_of(&d)));
        }
        let Ok(Some(record)) = Record::read(&d) else {
            continue;
        };
        if !lease::abandoned(&record, now) {
            continue;
        }
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        let name = d.metadata.name.clone().unwrap_or_default();
        let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        restore_record(&api, &d, &record).await?;
        eprintln!(
            "tpd: restored deployment/{name} in {ns}: its session ({} since {}) stopped renewing its lease at {}",
            record.holder, record.since.0, record.renew_time.0
        );
        repaired.push(format!("{ns}/{name}"));
    }
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "agent"}, "status": status})).expect("a pod")
    }

    #[test]
    fn a_failed_or_crashing_agent_is_given_up_on_but_a_starting_one_is_not() {
        let waiting = |reason: &str| {
            pod(
                serde_json::json!({"phase": "Running", "containerStatuses": [{"name": "agent", "image": "a", "imageID": "", "ready": false, "restartCount": 3, "state": {"waiting": {"reason": reason}}}]}),
            )
        };
        assert!(agent_gave_up(&pod(serde_json::json!({"phase": "Failed"}))));
        assert!(agent_gave_up(&waiting("CrashLoopBackOff")));
        assert!(!agent_gave_up(&waiting("ContainerCreating")));
        assert!(!agent_gave_up(&pod(serde_json::json!({"phase": "Pending"}))));
        assert!(cannot_pull(&waiting("ImagePullBackOff")) && cannot_pull(&waiting("ErrImagePull")));
        assert!(!cannot_pull(&waiting("ContainerCreating")) && !cannot_pull(&waiting("CrashLoopBackOff")));
    }

    #[test]
    fn a_replicaset_that_cannot_create_pods_is_read_from_the_deployment() {
        let deployment = |conditions: serde_json::Value| -> Deployment {
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": "api"}, "status": {"conditions": conditions}}),
            )
            .unwrap()
        };
        let refused = r#"pods "api-1" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true"#;
        let failing = deployment(serde_json::json!([
            {"type": "Available", "status": "True"},
            {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": refused},
        ]));
        assert_eq!(replica_failure(&failing).as_deref(), Some(refused));
        let recovered =
            deployment(serde_json::json!([{"type": "ReplicaFailure", "status": "False", "message": refused}]));
        assert_eq!(replica_failure(&recovered), None);
        assert_eq!(replica_failure(&deployment(serde_json::json!([]))), None);
    }
}
