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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the tpd.dev/swap annotation of deployment/{name} is not a swap record tpd understands")]
    Malformed { name: String, source: serde_json::Error },
    #[error("deployment/{name} was swapped by a newer tpd (record version {version}); restore it with that tpd")]
    Version { name: String, version: u32 },
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
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let Some(json) = deployment.metadata.annotations.as_ref().and_then(|a| a.get(names::ANNOTATION_SWAP)) else {
            return Ok(None);
        };
        let record: Record =
            serde_json::from_str(json).map_err(|source| Error::Malformed { name: name.clone(), source })?;
        if record.version > RECORD_VERSION {
            return Err(Error::Version { name, version: record.version });
        }
        Ok(Some(record))
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
