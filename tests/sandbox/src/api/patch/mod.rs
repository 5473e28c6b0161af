//! PATCH bodies: RFC 6902 JSON patch, RFC 7386 merge patch and Kubernetes'
//! strategic merge patch, chosen by Content-Type as kube-apiserver does.

mod strategic;

use serde_json::Value;

pub use strategic::strategic_merge;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    /// Server-side apply; the sandbox treats the applied config as a
    /// strategic merge patch (no field managers).
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<Self> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/json-patch+json" => Some(Self::Json),
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the body of the request is not valid JSON: {0}")]
    Body(#[from] serde_json::Error),
    #[error("the JSON patch could not be applied: {0}")]
    Json(#[from] json_patch::PatchError),
}

impl From<PatchError> for crate::api::status::ApiError {
    /// A body that does not parse is a bad request (400); a JSON patch that
    /// parses but does not apply is unprocessable (422), as kube-apiserver
    /// answers: clients tell "someone changed it" from "I sent garbage" by it.
    fn from(e: PatchError) -> Self {
        match e {
            PatchError::Body(_) => Self::bad_request(e.to_string()),
            PatchError::Json(_) => Self::patch_not_applicable(e.to_string()),
        }
    }
}

/// Applies `body` of `kind` to `current`.
pub fn apply(kind: PatchType, current: &Value, body: &[u8]) -> Result<Value, PatchError> {
    let mut doc = current.clone();
    match kind {
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)?;
            json_patch::patch(&mut doc, &patch)?;
        }
        PatchType::Merge => json_patch::merge(&mut doc, &serde_json::from_slice(body)?),
        PatchType::Strategic | PatchType::Apply => doc = strategic_merge(current, &serde_json::from_slice(body)?),
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types_pick_the_patch_kind() {
        assert_eq!(PatchType::from_content_type("application/merge-patch+json; charset=utf-8"), Some(PatchType::Merge));
        assert_eq!(PatchType::from_content_type("text/plain"), None);
    }

    #[test]
    fn json_and_merge_patches_apply() {
        let cur = json!({"spec": {"replicas": 1, "paused": true}});
        let j = apply(PatchType::Json, &cur, br#"[{"op":"replace","path":"/spec/replicas","value":3}]"#).unwrap();
        assert_eq!(j["spec"]["replicas"], 3);
        let m = apply(PatchType::Merge, &cur, br#"{"spec":{"paused":null}}"#).unwrap();
        assert_eq!(m, json!({"spec": {"replicas": 1}}));
        assert!(apply(PatchType::Json, &cur, br#"[{"op":"remove","path":"/nope"}]"#).is_err());
        assert!(apply(PatchType::Merge, &cur, b"{").is_err());
    }
}
