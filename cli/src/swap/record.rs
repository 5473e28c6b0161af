//! The swap record: the JSON kept in the `tpd.dev/swap` annotation of a
//! swapped Deployment (DESIGN.md decision 5). It holds everything restore
//! needs, who holds the swap, and the lease the session renews, so restore,
//! `tpd status`, stale-swap repair and refusing a second session all read the
//! cluster, never local state.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentStrategy};
use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tpd_wire::names;

/// Bumped when the record's shape changes incompatibly.
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: u32,
    pub session: String,
    /// `user@host` of the session.
    pub holder: String,
    pub since: Time,
    pub renew_time: Time,
    pub lease_seconds: i64,
    pub original: Original,
}

/// The original value of every field the swap changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Original {
    pub container: Container,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<DeploymentStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<BTreeMap<String, String>>,
}

/// Why a record in an annotation (`key`: a swap's or an intercept's)
/// cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the {key} annotation of deployment/{name} is not a record tpd understands")]
    Malformed { key: &'static str, name: String, source: serde_json::Error },
    #[error("deployment/{name} was changed by a newer tpd ({key} record version {version}); use that tpd")]
    Version { key: &'static str, name: String, version: u32 },
}

/// The record kept as JSON in annotation `key` of `deployment` (`None`
/// without one); refused when its `version` is newer than `newest`.
pub fn read_annotation<T: serde::de::DeserializeOwned>(
    deployment: &Deployment,
    key: &'static str,
    newest: u32,
    version: impl Fn(&T) -> u32,
) -> Result<Option<T>, Error> {
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let Some(json) = deployment.metadata.annotations.as_ref().and_then(|a| a.get(key)) else {
        return Ok(None);
    };
    let record: T =
        serde_json::from_str(json).map_err(|source| Error::Malformed { key, name: name.clone(), source })?;
    match version(&record) {
        v if v > newest => Err(Error::Version { key, name, version: v }),
        _ => Ok(Some(record)),
    }
}

impl Record {
    /// A fresh record of `session`, held by `holder` from `now`.
    pub fn new(session: &str, holder: &str, now: Timestamp, lease_seconds: i64, original: Original) -> Self {
        Record {
            version: RECORD_VERSION,
            session: session.to_owned(),
            holder: holder.to_owned(),
            since: Time(now),
            renew_time: Time(now),
            lease_seconds,
            original,
        }
    }

    /// The record on `deployment`, if it is swapped.
    pub fn read(deployment: &Deployment) -> Result<Option<Self>, Error> {
        read_annotation(deployment, names::ANNOTATION_SWAP, RECORD_VERSION, |r: &Record| r.version)
    }

    pub fn to_annotation(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// When the lease runs out unless renewed.
    pub fn expires(&self) -> Timestamp {
        self.renew_time.0 + SignedDuration::from_secs(self.lease_seconds)
    }

    pub fn renewed(&self, now: Timestamp) -> Self {
        Record { renew_time: Time(now), ..self.clone() }
    }
}
