//! What an intercepted Deployment carries about its intercept, in two kinds
//! of annotation:
//!
//! - `tpd.dev/intercept` ([`Record`]): what restore needs, written once by
//!   the first session and removed by the last: the real container the agent
//!   stands beside, the agent's [`Config`] (its ports) and each retargeted
//!   Service's original targetPorts.
//! - `tpd.dev/intercept.<session>` ([`Entry`]), one per live session: who
//!   holds it since when, its lease, its ports and filter (and whether it
//!   mirrors), and what the agents last said it got, which `tpd status`
//!   shows on any machine.
//!
//! One key per session, not one list, so that sessions renewing at the same
//! moment each patch their own key (a JSON patch `test` of that key's value
//! and a `replace`) and never conflict; a session that ends removes only its
//! key, and the last one (no live entry left) restores everything.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tpd_wire::intercept::{Config, Filter, Mirror, Route, Traffic};

use crate::swap::lease::Leased;

/// The annotation of the [`Record`]. Only tpd reads it, so it lives here,
/// not in `tpd_wire::names`.
pub const ANNOTATION: &str = "tpd.dev/intercept";
/// Each session's [`Entry`] is under this prefix followed by its id.
pub const ENTRY_PREFIX: &str = "tpd.dev/intercept.";
/// Bumped when the record's shape changes incompatibly.
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: u32,
    /// The real container, which keeps running beside the agent.
    pub container: String,
    /// The agent's ports, as in its `TPD_AGENT_INTERCEPT`.
    pub config: Config,
    /// By Service name: the ports whose targetPort the intercept changed.
    #[serde(default)]
    pub services: BTreeMap<String, Vec<OriginalTarget>>,
}

/// A Service port as it was before it was pointed at the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginalTarget {
    /// Its place in the Service's `ports`, used when it has no name.
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its targetPort; none means the port's own number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// The real container's port it reached, whose agent port it targets now.
    pub remote: u16,
}

/// One live session's intercept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub session: String,
    /// `user@host`.
    pub holder: String,
    pub since: Time,
    pub renew_time: Time,
    pub lease_seconds: i64,
    /// The real container's ports whose matching requests go to the session.
    pub ports: Vec<u16>,
    pub filter: Filter,
    /// Set when the session takes copies, not requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// What the agents said the session got, as of the last renewal.
    #[serde(default)]
    pub traffic: Traffic,
}

pub use crate::swap::record::Error;

impl Record {
    /// The record on `deployment`, if it is intercepted.
    pub fn read(deployment: &Deployment) -> Result<Option<Self>, Error> {
        crate::swap::record::read_annotation(deployment, ANNOTATION, RECORD_VERSION, |r: &Record| r.version)
    }

    pub fn to_annotation(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The remote ports the agent listens for.
    pub fn remotes(&self) -> Vec<u16> {
        self.config.ports.iter().map(|p| p.remote).collect()
    }
}

impl Entry {
    pub fn new(session: &str, holder: &str, now: Timestamp, ports: &[u16], filter: &Filter) -> Self {
        Entry {
            session: session.to_owned(),
            holder: holder.to_owned(),
            since: Time(now),
            renew_time: Time(now),
            lease_seconds: tpd_wire::intercept::LEASE.as_secs().try_into().unwrap_or(15),
            ports: ports.to_vec(),
            filter: filter.clone(),
            mirror: None,
            traffic: Traffic::default(),
        }
    }

    /// The entry of a session that takes copies (`--mirror`) when `mirror` is set.
    pub fn mirroring(self, mirror: Option<Mirror>) -> Self {
        Entry { mirror, ..self }
    }

    /// What the session takes, as the user asked for it.
    pub fn describe(&self) -> String {
        tpd_wire::intercept::describe(&self.filter, self.mirror)
    }

    /// Every session entry on `deployment`, oldest first; one that does not
    /// parse is left out (and so, once the record's other sessions are gone,
    /// removed by the restore).
    pub fn all(deployment: &Deployment) -> Vec<Entry> {
        let annotations = deployment.metadata.annotations.iter().flatten();
        let mut entries: Vec<Entry> = annotations
            .filter(|(k, _)| k.starts_with(ENTRY_PREFIX))
            .filter_map(|(k, v)| match serde_json::from_str(v) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::debug!("annotation {k} is not an intercept entry: {e}");
                    None
                }
            })
            .collect();
        entries.sort_by_key(|e| e.since.0);
        entries
    }

    /// The routes the session registers with every agent.
    pub fn routes(&self) -> Vec<Route> {
        self.ports.iter().map(|&port| Route { port, filter: self.filter.clone(), mirror: self.mirror }).collect()
    }

    /// When the lease runs out unless renewed.
    pub fn expires(&self) -> Timestamp {
        self.renew_time.0 + SignedDuration::from_secs(self.lease_seconds)
    }
}

/// The annotation key of `session`'s entry.
pub fn entry_key(session: &str) -> String {
    format!("{ENTRY_PREFIX}{session}")
}

impl Leased for Entry {
    fn key(&self) -> String {
        entry_key(&self.session)
    }

    fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn renewed(&self, now: Timestamp) -> Self {
        Entry { renew_time: Time(now), ..self.clone() }
    }

    fn renew_every(&self) -> std::time::Duration {
        tpd_wire::intercept::RENEW_EVERY
    }
}

/// A session's entry as its session renews it: each renewal also writes
/// what the agents last said the session got.
#[derive(Debug, Clone)]
pub struct Renewing {
    pub entry: Entry,
    pub traffic: watch::Receiver<Traffic>,
}

impl Leased for Renewing {
    fn key(&self) -> String {
        self.entry.key()
    }

    fn to_annotation(&self) -> String {
        self.entry.to_annotation()
    }

    fn renewed(&self, now: Timestamp) -> Self {
        let traffic = self.traffic.borrow().clone();
        Renewing { entry: Entry { traffic, ..self.entry.renewed(now) }, traffic: self.traffic.clone() }
    }

    fn renew_every(&self) -> std::time::Duration {
        self.entry.renew_every()
    }
}

/// A session's entry as the other sessions' tests need it: `session`'s
/// header filter, renewed `renewed_secs_ago` before `now`.
#[cfg(test)]
pub fn renewed_ago(session: &str, renewed_secs_ago: i64, now: Timestamp) -> Entry {
    let filter = Filter { headers: [("x-dev".into(), session.into())].into(), path_prefix: None, ..Filter::default() };
    let at = now - SignedDuration::from_secs(renewed_secs_ago);
    Entry::new(session, &format!("{session}@laptop"), at, &[8080], &filter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpd_wire::intercept::PortMap;

    fn filter(dev: &str) -> Filter {
        Filter { headers: [("x-dev".to_owned(), dev.to_owned())].into(), path_prefix: None, ..Filter::default() }
    }

    #[test]
    fn record_and_entries_round_trip_through_annotations() {
        let record = Record {
            version: RECORD_VERSION,
            container: "api".into(),
            config: Config { transport: 7700, intercept: 7701, ports: vec![PortMap { remote: 8080, listen: 7702 }] },
            services: [(
                "api".to_owned(),
                vec![OriginalTarget {
                    index: 0,
                    name: Some("http".into()),
                    target_port: Some(IntOrString::String("http".into())),
                    remote: 8080,
                }],
            )]
            .into(),
        };
        let now: Timestamp = "2026-12-07T10:02:00Z".parse().unwrap();
        let alice = Entry::new("s-alice", "alice@laptop", now, &[8080], &filter("alice"));
        let bob = Entry::new("s-bob", "bob@desk", now + SignedDuration::from_secs(60), &[8080], &filter("bob"));
        let mut d = Deployment::default();
        d.metadata.name = Some("api".into());
        d.metadata.annotations = Some(
            [
                (ANNOTATION.to_owned(), record.to_annotation()),
                (entry_key("s-bob"), bob.to_annotation()),
                (entry_key("s-alice"), alice.to_annotation()),
                (entry_key("junk"), "{".to_owned()),
            ]
            .into(),
        );
        assert_eq!(Record::read(&d).unwrap(), Some(record));
        assert_eq!(Entry::all(&d), vec![alice.clone(), bob]);
        assert_eq!(alice.expires(), now + SignedDuration::from_secs(15));
        assert_eq!(alice.routes(), vec![Route { port: 8080, filter: filter("alice"), mirror: None }]);
        let later = now + SignedDuration::from_secs(5);
        assert_eq!(alice.renewed(later).expires(), later + SignedDuration::from_secs(15));
        assert_eq!(alice.key(), "tpd.dev/intercept.s-alice");
        // A mirroring session's routes copy; each renewal writes its latest figures.
        let mirror = Some(Mirror { body_limit: 1024 });
        let carol = Entry::new("s-carol", "carol@box", now, &[8080], &Filter::default()).mirroring(mirror);
        assert_eq!(carol.routes(), vec![Route { port: 8080, filter: Filter::default(), mirror }]);
        assert_eq!(carol.describe(), "copies of every request");
        let (figures, traffic) = watch::channel(Traffic::default());
        let renewing = Renewing { entry: carol, traffic };
        figures.send_replace(Traffic { last_minute: 7, mirrored: 30, dropped: 2, tls_ports: vec![] });
        let renewed = renewing.renewed(later);
        assert_eq!(
            (renewed.entry.traffic.mirrored, renewed.entry.expires()),
            (30, later + SignedDuration::from_secs(15))
        );
        let read: Entry = serde_json::from_str(&renewed.to_annotation()).unwrap();
        assert_eq!(read, renewed.entry);
    }

    #[test]
    fn a_newer_or_broken_record_is_refused() {
        let mut d = Deployment::default();
        d.metadata.annotations = Some([(ANNOTATION.to_owned(), "nope".to_owned())].into());
        assert!(matches!(Record::read(&d), Err(Error::Malformed { .. })));
        let newer = r#"{"version":99,"container":"c","config":{"transport":1,"intercept":2,"ports":[]}}"#;
        d.metadata.annotations = Some([(ANNOTATION.to_owned(), newer.to_owned())].into());
        assert!(matches!(Record::read(&d), Err(Error::Version { version: 99, .. })));
        assert_eq!(Record::read(&Deployment::default()).unwrap(), None);
    }
}
