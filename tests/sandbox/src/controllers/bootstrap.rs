//! The objects every cluster starts with: the system namespaces, the
//! `kubernetes` Service and its Endpoints, and the ServiceCIDR that tells
//! clients the service range; plus the `default` ServiceAccount of every
//! namespace (the serviceaccount controller's job) and its
//! `kube-root-ca.crt` ConfigMap (the root-ca-cert-publisher's).

use serde_json::{Value, json};

use super::objects::name;
use crate::api::admission::FieldValidation;
use crate::api::registry::Registry;
use crate::api::resources::by_kind;
use crate::layout;

pub const NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

fn ensure(reg: &Registry, kind: &str, ns: &str, obj: Value) {
    let res = by_kind(kind);
    let obj_name = name(&obj).to_owned();
    if reg.get(res, ns, &obj_name).is_ok() {
        return;
    }
    if let Err(e) = reg.create(res, ns, obj, FieldValidation::Strict) {
        tracing::error!(kind, name = obj_name, error = %e.message, "creating a bootstrap object failed");
    }
}

/// Creates what is missing. `api_port` is the API server's secure port
/// (the `kubernetes` Service's target).
pub fn run(reg: &Registry, api_port: u16) {
    for ns in NAMESPACES {
        ensure(reg, "Namespace", "", json!({"metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}}}));
    }
    ensure(
        reg,
        "Service",
        "default",
        json!({
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": layout::KUBERNETES_SERVICE_IP.to_string(),
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": api_port}]},
        }),
    );
    ensure(
        reg,
        "Endpoints",
        "default",
        json!({
            "metadata": {"name": "kubernetes", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
            "subsets": [{"addresses": [{"ip": layout::NETWORK_GATEWAY.to_string()}],
                "ports": [{"name": "https", "port": api_port, "protocol": "TCP"}]}],
        }),
    );
    ensure(
        reg,
        "ServiceCIDR",
        "",
        json!({"metadata": {"name": "kubernetes"}, "spec": {"cidrs": [layout::SERVICE_CIDR]}}),
    );
    mark_service_cidr_ready(reg);
    default_service_accounts(reg);
}

fn mark_service_cidr_ready(reg: &Registry) {
    let res = by_kind("ServiceCIDR");
    let Ok(mut cidr) = reg.get(res, "", "kubernetes") else {
        return;
    };
    if cidr.pointer("/status/conditions").is_some() {
        return;
    }
    let now = super::objects::now_rfc3339();
    cidr["status"] = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "", "message": "", "lastTransitionTime": now}]});
    let _ = reg.update(res, "", "kubernetes", cidr, true, FieldValidation::Ignore);
}

/// Every namespace gets the cluster CA as `kube-root-ca.crt`, which the
/// node puts in each pod's service-account volume as `ca.crt`.
pub fn root_ca_config_maps(reg: &Registry, ca_pem: &str) {
    for ns in reg.list(by_kind("Namespace"), None).0 {
        ensure(
            reg,
            "ConfigMap",
            name(&ns),
            json!({"metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": ca_pem}}),
        );
    }
}

/// Every namespace gets a `default` ServiceAccount.
pub fn default_service_accounts(reg: &Registry) {
    for ns in reg.list(by_kind("Namespace"), None).0 {
        ensure(reg, "ServiceAccount", name(&ns), json!({"metadata": {"name": "default"}}));
    }
}
