//! Pod Security's part in writes of a Namespace, as kube-apiserver's: labels
//! it cannot read are refused (422), and a label change that makes the
//! enforced level stricter is answered with warnings naming the existing
//! pods that would now be refused (what `kubectl label` prints); the pods
//! themselves keep running.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{AUDIT, AUDIT_VERSION, ENFORCE, ENFORCE_VERSION, WARN, WARN_VERSION};
use super::{Level, describe_reasons, evaluate, parse_level, policy, valid_version};
use crate::api::status::{ApiError, Cause};

/// The Pod Security labels of `labels` whose values are not a level or a
/// version, as kube-apiserver's field errors, in its order.
fn label_causes(labels: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    for (label, is_level) in [
        (ENFORCE, true),
        (ENFORCE_VERSION, false),
        (AUDIT, true),
        (AUDIT_VERSION, false),
        (WARN, true),
        (WARN_VERSION, false),
    ] {
        let Some(value) = labels.get(label).and_then(Value::as_str) else { continue };
        let (ok, why) = if is_level {
            (parse_level(value).is_some(), "must be one of privileged, baseline, restricted")
        } else {
            (valid_version(value), r#"must be "latest" or "v1.x""#)
        };
        if !ok {
            causes.push(Cause::invalid(format!("metadata.labels[{label}]"), &Value::from(value), why));
        }
    }
    causes
}

/// The admission of a write of Namespace `ns` (`old` for an update) whose
/// `pods` exist: the warnings to send, or the 422 for unreadable labels.
pub fn admit_namespace(ns: &Value, old: Option<&Value>, pods: &[Value]) -> Result<Vec<String>, ApiError> {
    let labels = &ns["metadata"]["labels"];
    let name = ns["metadata"]["name"].as_str().unwrap_or_default();
    let causes = label_causes(labels);
    let old_labels = old.map(|o| &o["metadata"]["labels"]);
    // An update may keep labels that were already wrong.
    if !causes.is_empty() && old_labels.is_none_or(|o| label_causes(o) != causes) {
        return Err(ApiError::invalid("", "Namespace", name, causes));
    }
    let Some(old_labels) = old_labels else { return Ok(Vec::new()) };
    let (new, before) = (policy(labels).enforce, policy(old_labels).enforce);
    let relaxed = new.version == before.version && new.level <= before.level;
    if new == before || new.level == Level::Privileged || relaxed {
        return Ok(Vec::new());
    }
    // Pods with the same reasons are named once: the first name and a count.
    let mut by_reasons: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for pod in pods {
        let violations = evaluate(new.level, &pod["spec"]);
        if violations.is_empty() {
            continue;
        }
        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let entry = by_reasons.entry(describe_reasons(&violations)).or_insert_with(|| (pod_name.to_owned(), 0));
        if pod_name < entry.0.as_str() {
            entry.0 = pod_name.to_owned();
        }
        entry.1 += 1;
    }
    if by_reasons.is_empty() {
        return Ok(Vec::new());
    }
    let mut named: Vec<String> = by_reasons
        .into_iter()
        .map(|(reasons, (first, count))| match count {
            1 => format!("{first}: {reasons}"),
            2 => format!("{first} (and 1 other pod): {reasons}"),
            n => format!("{first} (and {} other pods): {reasons}", n - 1),
        })
        .collect();
    named.sort();
    let mut warnings =
        vec![format!("existing pods in namespace \"{name}\" violate the new PodSecurity enforce level \"{new}\"")];
    warnings.extend(named);
    Ok(warnings)
}
