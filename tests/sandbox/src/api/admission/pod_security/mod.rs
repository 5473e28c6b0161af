//! Pod Security admission, as kube-apiserver's built-in `PodSecurity`
//! plugin: the namespace's `pod-security.kubernetes.io/enforce` level
//! (`privileged`, `baseline`, `restricted`; `-version` `latest` or `v1.N`)
//! rejects pods that violate it, with kube-apiserver's message, so a
//! ReplicaSet's pods are refused too; the `warn` level answers pods and pod
//! templates (Deployments, ReplicaSets) with a `Warning`; the labels
//! themselves are checked when a Namespace is written (`namespace`).
//!
//! The checks are those of the Pod Security Standards' latest version for
//! Linux pods, in the order kube-apiserver runs them, which is the order of
//! the reasons in its message. What the sandbox leaves out: checks of older
//! versions (a `-version` label is read and shown, not applied), AppArmor,
//! Windows host processes, probe and lifecycle hosts, exemptions and the
//! `audit` level.

mod checks;
mod namespace;

use std::fmt;

use serde_json::Value;

use crate::api::status::ApiError;

const ENFORCE: &str = "pod-security.kubernetes.io/enforce";
const ENFORCE_VERSION: &str = "pod-security.kubernetes.io/enforce-version";
const WARN: &str = "pod-security.kubernetes.io/warn";
const WARN_VERSION: &str = "pod-security.kubernetes.io/warn-version";
const AUDIT: &str = "pod-security.kubernetes.io/audit";
const AUDIT_VERSION: &str = "pod-security.kubernetes.io/audit-version";

pub use namespace::admit_namespace;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

/// A level and the version of the standards it names (`restricted:latest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelVersion {
    pub level: Level,
    pub version: String,
}

impl fmt::Display for LevelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        };
        write!(f, "{level}:{}", self.version)
    }
}

/// What a namespace's labels ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub enforce: LevelVersion,
    pub warn: LevelVersion,
}

/// The policy of a namespace with `labels` (its `metadata.labels`). As
/// kube-apiserver: an unknown enforce level enforces `restricted` (fail
/// closed), an unknown warn level warns of nothing (fail open), a version
/// that is neither `latest` nor `v1.N` is `latest`; a level not set is
/// `privileged`.
pub fn policy(labels: &Value) -> Policy {
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    let level = |key: &str, invalid: Level| label(key).map_or(Level::Privileged, |v| parse_level(v).unwrap_or(invalid));
    let version = |key: &str| label(key).filter(|v| valid_version(v)).unwrap_or("latest").to_owned();
    Policy {
        enforce: LevelVersion { level: level(ENFORCE, Level::Restricted), version: version(ENFORCE_VERSION) },
        warn: LevelVersion { level: level(WARN, Level::Privileged), version: version(WARN_VERSION) },
    }
}

fn parse_level(v: &str) -> Option<Level> {
    match v {
        "privileged" => Some(Level::Privileged),
        "baseline" => Some(Level::Baseline),
        "restricted" => Some(Level::Restricted),
        _ => None,
    }
}

/// `latest` or `v1.N` (no leading zero).
fn valid_version(v: &str) -> bool {
    v == "latest"
        || v.strip_prefix("v1.").is_some_and(|n| n == "0" || (!n.starts_with('0') && n.parse::<u32>().is_ok()))
}

/// One failed check: kube-apiserver's reason and its detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub reason: &'static str,
    pub detail: String,
}

/// The reasons as kube-apiserver lists them: `reason (detail), reason (detail)`.
pub fn describe(violations: &[Violation]) -> String {
    let parts: Vec<String> = violations.iter().map(|v| format!("{} ({})", v.reason, v.detail)).collect();
    parts.join(", ")
}

/// The reasons alone, as the warnings about existing pods list them.
fn describe_reasons(violations: &[Violation]) -> String {
    let reasons: Vec<&str> = violations.iter().map(|v| v.reason).collect();
    reasons.join(", ")
}

/// The checks of `level` that the pod (its metadata and spec) fails.
pub fn evaluate(level: Level, spec: &Value) -> Vec<Violation> {
    if level == Level::Privileged {
        return Vec::new();
    }
    use checks::*;
    let pod = Pod::new(spec);
    // Baseline's own checks, then those restricted replaces with its own.
    let mut run: Vec<Check> =
        vec![host_namespaces, host_path_volumes, host_ports, privileged, proc_mount, se_linux_options, sysctls];
    match level {
        Level::Baseline => run.extend([capabilities_baseline as Check, seccomp_baseline]),
        _ => run.extend([
            allow_privilege_escalation as Check,
            capabilities_restricted,
            restricted_volumes,
            run_as_non_root,
            run_as_user,
            seccomp_restricted,
        ]),
    }
    run.iter().filter_map(|check| check(&pod)).collect()
}

/// The admission of a write of a `kind` object `obj` (`old` for an
/// update) in a namespace with `labels`: the warnings to send with it, or
/// the 403 that refuses a pod, as kube-apiserver words both. Pods are
/// judged on create and on updates that change an image; pod templates
/// are only warned about, so a Deployment is stored and its ReplicaSet's
/// pods are refused.
pub fn admit(kind: &str, obj: &Value, old: Option<&Value>, labels: &Value) -> Result<Vec<String>, ApiError> {
    let spec = match kind {
        "Pod" if old.is_some_and(|old| !images_changed(old, obj)) => return Ok(Vec::new()),
        "Pod" => &obj["spec"],
        "Deployment" | "ReplicaSet" => &obj["spec"]["template"]["spec"],
        _ => return Ok(Vec::new()),
    };
    let policy = policy(labels);
    if kind == "Pod" {
        let violations = evaluate(policy.enforce.level, spec);
        if !violations.is_empty() {
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let why = format!("violates PodSecurity \"{}\": {}", policy.enforce, describe(&violations));
            return Err(ApiError::forbidden("", "pods", name, &why));
        }
    }
    let violations = evaluate(policy.warn.level, spec);
    if violations.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![format!("would violate PodSecurity \"{}\": {}", policy.warn, describe(&violations))])
}

/// Whether a pod update changes what Pod Security judges: the images (the
/// only container fields a pod update may change) or the containers.
fn images_changed(old: &Value, new: &Value) -> bool {
    let images = |pod: &Value| -> Vec<Value> {
        ["initContainers", "containers"]
            .iter()
            .flat_map(|k| pod["spec"][*k].as_array().cloned().unwrap_or_default())
            .map(|c| c["image"].clone())
            .collect()
    };
    images(old) != images(new)
}

#[cfg(test)]
mod tests;
