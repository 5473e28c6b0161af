//! Object operations with the API's rules: type checks, admission, status
//! codes, patch retries and garbage collection of dependents. The HTTP
//! handlers and the controllers both go through here.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::admission::{self, FieldValidation};
use super::patch::{self, PatchType};
use super::resources::{RESOURCES, Resource};
use super::status::{ApiError, ApiResult};
use crate::store::{Store, StoreError, rv_of};

/// A written object and the warnings (unknown fields, Pod Security) to send with it.
pub type Written = (Value, Vec<String>);

pub struct Registry {
    pub store: Arc<Store>,
    /// Serialises Service writes so two creates never take the same ClusterIP.
    allocation: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn ns_of<'a>(res: &Resource, ns: &'a str) -> &'a str {
    if res.namespaced { ns } else { "" }
}

fn store_error(res: &Resource, name: &str, e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::not_found(res.group, res.plural, name),
        StoreError::AlreadyExists => ApiError::already_exists(res.group, res.plural, name),
        StoreError::Conflict => ApiError::conflict(res.group, res.plural, name),
        StoreError::Gone(rv) => ApiError::gone(rv),
    }
}

impl Registry {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store, allocation: Mutex::new(()) }
    }

    pub fn get(&self, res: &Resource, ns: &str, name: &str) -> ApiResult<Value> {
        self.store.get(&res.key(), ns_of(res, ns), name).ok_or_else(|| ApiError::not_found(res.group, res.plural, name))
    }

    /// All objects of a resource, in a namespace or all of them.
    pub fn list(&self, res: &Resource, ns: Option<&str>) -> (Vec<Value>, u64) {
        self.store.list(&res.key(), ns.filter(|_| res.namespaced))
    }

    fn lock_allocation(&self, res: &Resource) -> Option<std::sync::MutexGuard<'_, ()>> {
        (res.kind == "Service").then(|| self.allocation.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn create(&self, res: &Resource, ns: &str, body: Value, mode: FieldValidation) -> ApiResult<Written> {
        let _guard = self.lock_allocation(res);
        let (obj, warnings) = self.admit_create(res, ns, body, mode)?;
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let stored =
            self.store.create(&res.key(), ns_of(res, ns), &name, obj).map_err(|e| store_error(res, &name, e))?;
        // A controller may create a dependent of an owner deleted just after
        // it looked (a ReplicaSet of a Deployment being deleted). Kubernetes'
        // garbage collector removes such an object; so does this. Checked
        // after storing: a delete that listed dependents before this object
        // was stored has removed the owner by now.
        if self.owners_gone(&stored) {
            let _ = self.delete(res, ns, &name, false);
        }
        Ok((stored, warnings))
    }

    /// What `create` would store, and its warnings: every check of a create
    /// (typed fields, the namespace, defaults, Pod Security) with nothing
    /// stored, which is also a `dryRun=All` create.
    pub fn admit_create(&self, res: &Resource, ns: &str, body: Value, mode: FieldValidation) -> ApiResult<Written> {
        let mut warnings = admission::check_typed(res, &body, mode)?;
        if res.namespaced && self.store.get("namespaces", "", ns).is_none() {
            return Err(ApiError::not_found("", "namespaces", ns));
        }
        let obj = admission::prepare_create(res, ns, body, &self.store)?;
        warnings.extend(self.pod_security(res, &obj, None)?);
        Ok((obj, warnings))
    }

    /// Pod Security admission of `obj` in its namespace, by the namespace's
    /// labels; of a Namespace, by its own labels and pods.
    fn pod_security(&self, res: &Resource, obj: &Value, old: Option<&Value>) -> ApiResult<Vec<String>> {
        if res.kind == "Namespace" {
            let name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default();
            let (pods, _) = self.list(super::resources::by_kind("Pod"), Some(name));
            return admission::pod_security::admit_namespace(obj, old, &pods);
        }
        let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or_default();
        let labels = self.store.get("namespaces", "", ns).map(|n| n["metadata"]["labels"].clone()).unwrap_or_default();
        admission::pod_security::admit(res.kind, obj, old, &labels)
    }

    /// Whether `obj` has owners and none of them exists any more (by uid).
    /// An owner of a kind the sandbox does not serve counts as present.
    fn owners_gone(&self, obj: &Value) -> bool {
        let refs = obj.pointer("/metadata/ownerReferences").and_then(Value::as_array);
        let Some(refs) = refs.filter(|r| !r.is_empty()) else { return false };
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
        refs.iter().all(|r| {
            let kind =
                RESOURCES.iter().find(|res| r["kind"] == res.kind && r["apiVersion"] == res.api_version().as_str());
            kind.is_some_and(|res| {
                self.get(res, ns, r["name"].as_str().unwrap_or_default())
                    .map_or(true, |owner| owner["metadata"]["uid"] != r["uid"])
            })
        })
    }

    /// PUT of the object or of its status. A resourceVersion in the body is
    /// a precondition (409 Conflict when stale).
    pub fn update(
        &self,
        res: &Resource,
        ns: &str,
        name: &str,
        body: Value,
        status_only: bool,
        mode: FieldValidation,
    ) -> ApiResult<Written> {
        let mut warnings = admission::check_typed(res, &body, mode)?;
        let _guard = self.lock_allocation(res);
        let old = self.get(res, ns, name)?;
        let expected = rv_of(&body).filter(|rv| !rv.is_empty()).map(str::to_owned);
        if let Some(rv) = &expected
            && rv_of(&old) != Some(rv.as_str())
        {
            return Err(ApiError::conflict(res.group, res.plural, name));
        }
        let mut new = admission::prepare_update(res, &old, body, status_only, &self.store)?;
        if !status_only {
            warnings.extend(self.pod_security(res, &new, Some(&old))?);
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == old {
            return Ok((old, warnings));
        }
        let precondition = rv_of(&old).map(str::to_owned);
        let stored = self
            .store
            .update(&res.key(), ns_of(res, ns), name, new, precondition.as_deref())
            .map_err(|e| store_error(res, name, e))?;
        Ok((stored, warnings))
    }

    /// PATCH: applies the patch to the current object and writes it back,
    /// retrying when another writer got in between (as kube-apiserver does).
    /// An apply patch of a missing object creates it.
    pub fn patch(
        &self,
        res: &Resource,
        ns: &str,
        name: &str,
        (kind, body): (PatchType, &[u8]),
        status_only: bool,
        mode: FieldValidation,
    ) -> ApiResult<Written> {
        for _ in 0..5 {
            let current = match self.get(res, ns, name) {
                Err(e) if kind == PatchType::Apply && e.code == 404 => {
                    let obj: Value = serde_json::from_slice(body)
                        .map_err(|e| ApiError::bad_request(format!("apply patch must be JSON in the sandbox: {e}")))?;
                    return self.create(res, ns, obj, mode);
                }
                other => other?,
            };
            let mut patched = patch::apply(kind, &current, body).map_err(ApiError::from)?;
            // The patch's own resourceVersion (if any) is the precondition; otherwise the one we read.
            let own_rv = rv_of(&patched).is_some_and(|rv| rv != rv_of(&current).unwrap_or_default());
            if !own_rv {
                patched["metadata"]["resourceVersion"] = json!(rv_of(&current));
            }
            match self.update(res, ns, name, patched, status_only, mode) {
                Err(e) if e.reason == "Conflict" && !own_rv => continue,
                other => return other,
            }
        }
        Err(ApiError::conflict(res.group, res.plural, name))
    }

    /// Deletes an object, then its dependents (or orphans them).
    pub fn delete(&self, res: &Resource, ns: &str, name: &str, orphan: bool) -> ApiResult<Value> {
        let gone = self.store.delete(&res.key(), ns_of(res, ns), name).map_err(|e| store_error(res, name, e))?;
        if let Some(uid) = gone.pointer("/metadata/uid").and_then(Value::as_str) {
            self.collect_dependents(uid, orphan);
        }
        if res.kind == "Namespace" {
            self.empty_namespace(name);
        }
        Ok(gone)
    }

    fn collect_dependents(&self, owner_uid: &str, orphan: bool) {
        for res in RESOURCES.iter().filter(|r| !r.create_only) {
            let (items, _) = self.list(res, None);
            for item in items {
                let refs = item.pointer("/metadata/ownerReferences").and_then(Value::as_array);
                if !refs.into_iter().flatten().any(|r| r["uid"] == owner_uid) {
                    continue;
                }
                let ns = item["metadata"]["namespace"].as_str().unwrap_or_default();
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                // A dependent that is already gone or changed meanwhile is not an error.
                if orphan {
                    let mut kept = item.clone();
                    if let Some(refs) = kept["metadata"]["ownerReferences"].as_array_mut() {
                        refs.retain(|r| r["uid"] != owner_uid);
                    }
                    let _ = self.store.update(&res.key(), ns, name, kept, rv_of(&item));
                } else {
                    let _ = self.delete(res, ns, name, false);
                }
            }
        }
    }

    fn empty_namespace(&self, ns: &str) {
        for res in RESOURCES.iter().filter(|r| r.namespaced && !r.create_only) {
            for item in self.list(res, Some(ns)).0 {
                let _ = self.delete(res, ns, item["metadata"]["name"].as_str().unwrap_or_default(), false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::by_kind;

    fn registry() -> Registry {
        let r = Registry::new(Arc::new(Store::new()));
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}});
        r.create(by_kind("Namespace"), "", ns, FieldValidation::Strict).expect("namespace");
        r
    }

    fn config_map(r: &Registry, name: &str, owner: Option<&Value>) -> ApiResult<Written> {
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}});
        if let Some(o) = owner {
            cm["metadata"]["ownerReferences"] = json!([{
                "apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["metadata"]["name"],
                "uid": o["metadata"]["uid"], "controller": true,
            }]);
        }
        r.create(by_kind("ConfigMap"), "default", cm, FieldValidation::Strict)
    }

    #[test]
    fn a_dependent_created_after_its_owner_was_deleted_is_collected() {
        let r = registry();
        let (owner, _) = config_map(&r, "owner", None).expect("owner");
        config_map(&r, "kept", Some(&owner)).expect("dependent");
        assert!(r.get(by_kind("ConfigMap"), "default", "kept").is_ok(), "its owner exists");

        r.delete(by_kind("ConfigMap"), "default", "owner", false).expect("delete");
        assert!(r.get(by_kind("ConfigMap"), "default", "kept").is_err(), "collected with its owner");
        config_map(&r, "late", Some(&owner)).expect("a create after the delete still succeeds");
        assert!(r.get(by_kind("ConfigMap"), "default", "late").is_err(), "and is collected at once");

        // A new owner of the same name is another object (another uid).
        let (again, _) = config_map(&r, "owner", None).expect("owner again");
        assert_ne!(again["metadata"]["uid"], owner["metadata"]["uid"]);
        config_map(&r, "stale", Some(&owner)).expect("create");
        assert!(r.get(by_kind("ConfigMap"), "default", "stale").is_err(), "owned by the deleted uid");
    }

    #[test]
    fn a_dry_run_create_is_admitted_or_refused_and_never_stored() {
        let r = registry();
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "locked",
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
        r.create(by_kind("Namespace"), "", ns, FieldValidation::Strict).expect("namespace");
        let pod = |ns: &str| {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": ns},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
        };

        let (admitted, _) = r.admit_create(by_kind("Pod"), "default", pod("default"), FieldValidation::Strict).unwrap();
        assert_eq!(admitted["metadata"]["name"], "probe");
        assert!(r.get(by_kind("Pod"), "default", "probe").is_err(), "a dry run stores nothing");

        let refused = r.admit_create(by_kind("Pod"), "locked", pod("locked"), FieldValidation::Strict).unwrap_err();
        assert_eq!(refused.code, axum::http::StatusCode::FORBIDDEN);
        assert!(refused.message.contains("violates PodSecurity \"restricted:latest\""), "{}", refused.message);
    }
}
