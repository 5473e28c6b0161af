//! The lease on a swap, with no IO: whether a Deployment may be swapped now,
//! when a swap counts as abandoned, and how often a session renews.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::record::Record;

/// How long a swap stays held without renewal.
pub const LEASE_SECONDS: i64 = 15;
/// A session renews three times per lease, so one slow API call does not lose it.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How soon a renewal the API server did not take is tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Automatic repair waits this long past expiry, so a session whose renewal
/// is merely late (a network blip) is not restored under its feet;
/// `--force` does not wait.
pub const REPAIR_GRACE: SignedDuration = SignedDuration::from_secs(15);

/// What to do with a Deployment that may already be swapped.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Not swapped: swap it.
    Free,
    /// Held by a session whose lease is current (or only just expired and
    /// `--force` was not given): refuse, naming the holder.
    Held { holder: String, since: Timestamp, expired: bool },
    /// Swapped by a session that is gone: restore it first, then swap.
    Abandoned(Box<Record>),
}

pub fn claim(existing: Option<&Record>, force: bool, now: Timestamp) -> Claim {
    match existing {
        None => Claim::Free,
        Some(r) if abandoned(r, now) || (force && r.expires() < now) => Claim::Abandoned(Box::new(r.clone())),
        Some(r) => Claim::Held { holder: r.holder.clone(), since: r.since.0, expired: r.expires() < now },
    }
}

/// Whether automatic repair may restore this swap.
pub fn abandoned(record: &Record, now: Timestamp) -> bool {
    past_grace(record.expires(), now)
}

/// Whether a lease that ran out at `expires` is past the repair grace:
/// its session is taken to be gone.
pub fn past_grace(expires: Timestamp, now: Timestamp) -> bool {
    expires + REPAIR_GRACE < now
}

/// A record kept in one annotation of a Deployment whose lease a session
/// renews (the swap's record, an intercept's session entry).
pub trait Leased: Clone + Send + Sync + 'static {
    /// The annotation that holds it.
    fn key(&self) -> String;
    fn to_annotation(&self) -> String;
    fn renewed(&self, now: Timestamp) -> Self;
    /// How often its session renews it.
    fn renew_every(&self) -> Duration;
}

impl Leased for Record {
    fn key(&self) -> String {
        tpd_wire::names::ANNOTATION_SWAP.to_owned()
    }

    fn to_annotation(&self) -> String {
        Record::to_annotation(self)
    }

    fn renewed(&self, now: Timestamp) -> Self {
        Record::renewed(self, now)
    }

    fn renew_every(&self) -> Duration {
        RENEW_EVERY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swap::record::{Original, RECORD_VERSION};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn record(renewed: i64) -> Record {
        Record {
            version: RECORD_VERSION,
            session: "s1".into(),
            holder: "ana@laptop".into(),
            since: Time(at(0)),
            renew_time: Time(at(renewed)),
            lease_seconds: LEASE_SECONDS,
            original: Original { container: Default::default(), replicas: Some(1), strategy: None, pod_labels: None },
        }
    }

    #[test]
    fn claims_over_the_lease_lifetime() {
        let r = record(100);
        let held = |expired| Claim::Held { holder: "ana@laptop".into(), since: at(0), expired };
        let abandoned = Claim::Abandoned(Box::new(r.clone()));
        // (now, force, expected)
        let table = [
            (101, false, held(false)),
            (101, true, held(false)), // --force never takes a live lease
            (100 + LEASE_SECONDS + 1, false, held(true)),
            (100 + LEASE_SECONDS + 1, true, abandoned.clone()),
            (100 + LEASE_SECONDS + 16, false, abandoned.clone()),
        ];
        for (now, force, want) in table {
            assert_eq!(claim(Some(&r), force, at(now)), want, "now=+{now}s force={force}");
        }
        assert_eq!(claim(None, false, at(0)), Claim::Free);
    }

    #[test]
    fn renewal_moves_expiry() {
        let r = record(0);
        assert!(abandoned(&r, at(31)));
        assert!(!abandoned(&r.renewed(at(30)), at(31)));
    }
}
