//! The end of an intercept: a session removes its entry and, when no live
//! session is left, puts the Services and then the Deployment back; `tpd
//! restore` does that whoever holds it, and a swap's repair for sessions
//! that stopped renewing. Every patch is guarded, so a session that joins
//! meanwhile keeps the intercept.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use tpd_wire::intercept;

use super::apply::{ATTEMPTS, Grace, live_entries, restore_services, retarget_services};
use super::plan;
use super::record::{Entry, Record, entry_key};
use crate::rollout::conflict;
use crate::swap::lease;
use crate::swap::plan::{annotation_pointer, guarded_diff};

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
    use crate::intercept::record::renewed_ago as entry;

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
}
