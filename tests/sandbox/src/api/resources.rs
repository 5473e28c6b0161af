//! The resources the sandbox serves: one table that discovery, routing,
//! validation and the openapi stub all read.

use serde_json::Value;

/// How a body is checked against its k8s-openapi type: deserialise, then
/// serialise again (what comes back is what the type knows).
pub type Typed = fn(&Value) -> Result<Value, serde_json::Error>;

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<Value, serde_json::Error> {
    serde_json::to_value(serde_json::from_value::<T>(v.clone())?)
}

#[derive(Debug)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Subresources beyond the object itself (`status`, `scale`, `log`...).
    pub subresources: &'static [&'static str],
    /// Only `create` (reviews), nothing stored.
    pub create_only: bool,
    pub typed: Typed,
}

const CRUD: &[&str] = &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"];

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        (self.group, self.version, self.plural) == (other.group, other.version, other.plural)
    }
}

impl Resource {
    /// The store key: `pods`, `deployments.apps`.
    pub fn key(&self) -> String {
        if self.group.is_empty() { self.plural.to_owned() } else { format!("{}.{}", self.plural, self.group) }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_owned() } else { format!("{}/{}", self.group, self.version) }
    }

    pub fn verbs(&self) -> &'static [&'static str] {
        if self.create_only { &["create"] } else { CRUD }
    }

    pub fn has_status(&self) -> bool {
        self.subresources.contains(&"status")
    }
}

use k8s_openapi::api::{
    apps::v1 as apps, authorization::v1 as authz, core::v1 as core, discovery::v1 as disc, networking::v1 as net,
};

macro_rules! res {
    ($group:expr, $plural:expr, $singular:expr, $kind:expr, $ns:expr, $short:expr, $cat:expr, $sub:expr, $ty:ty) => {
        Resource {
            group: $group,
            version: "v1",
            plural: $plural,
            singular: $singular,
            kind: $kind,
            namespaced: $ns,
            short_names: $short,
            categories: $cat,
            subresources: $sub,
            create_only: false,
            typed: typed::<$ty>,
        }
    };
}

pub static RESOURCES: &[Resource] = &[
    res!("", "namespaces", "namespace", "Namespace", false, &["ns"], &[], &["status"], core::Namespace),
    res!("", "pods", "pod", "Pod", true, &["po"], &["all"], &["status", "log", "exec", "portforward"], core::Pod),
    res!("", "services", "service", "Service", true, &["svc"], &["all"], &["status"], core::Service),
    res!("", "endpoints", "endpoints", "Endpoints", true, &["ep"], &[], &[], core::Endpoints),
    res!("", "configmaps", "configmap", "ConfigMap", true, &["cm"], &[], &[], core::ConfigMap),
    res!("", "secrets", "secret", "Secret", true, &[], &[], &[], core::Secret),
    res!("", "nodes", "node", "Node", false, &["no"], &[], &["status"], core::Node),
    res!(
        "",
        "serviceaccounts",
        "serviceaccount",
        "ServiceAccount",
        true,
        &["sa"],
        &[],
        &["token"],
        core::ServiceAccount
    ),
    res!("", "events", "event", "Event", true, &["ev"], &[], &[], core::Event),
    res!(
        "apps",
        "deployments",
        "deployment",
        "Deployment",
        true,
        &["deploy"],
        &["all"],
        &["status", "scale"],
        apps::Deployment
    ),
    res!(
        "apps",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        true,
        &["rs"],
        &["all"],
        &["status", "scale"],
        apps::ReplicaSet
    ),
    res!(
        "discovery.k8s.io",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
        &[],
        &[],
        &[],
        disc::EndpointSlice
    ),
    res!(
        "networking.k8s.io",
        "servicecidrs",
        "servicecidr",
        "ServiceCIDR",
        false,
        &[],
        &[],
        &["status"],
        net::ServiceCIDR
    ),
    Resource {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        singular: "selfsubjectaccessreview",
        kind: "SelfSubjectAccessReview",
        namespaced: false,
        short_names: &[],
        categories: &[],
        subresources: &[],
        create_only: true,
        typed: typed::<authz::SelfSubjectAccessReview>,
    },
];

/// The groups besides the core one, in discovery order.
pub const GROUPS: &[&str] = &["apps", "discovery.k8s.io", "networking.k8s.io", "authorization.k8s.io"];

/// Looks a resource up by group and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Looks a resource up by kind (every kind served is unique).
pub fn by_kind(kind: &str) -> &'static Resource {
    RESOURCES.iter().find(|r| r.kind == kind).unwrap_or_else(|| panic!("kind {kind} is not in the table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_found() {
        for r in RESOURCES {
            assert_eq!(RESOURCES.iter().filter(|o| o.key() == r.key()).count(), 1);
            assert_eq!(by_kind(r.kind).key(), r.key());
        }
        assert_eq!(find("apps", "v1", "deployments").map(|r| r.kind), Some("Deployment"));
        assert!(find("", "v1", "deployments").is_none());
    }
}
