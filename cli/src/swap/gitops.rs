//! Deployments that a GitOps controller keeps in sync: the controller will
//! undo a swap, so the user is told what will happen and how to pause it.

use k8s_openapi::api::apps::v1::Deployment;

/// A warning naming the controller, what it will do, and how to pause it;
/// `None` when no Argo CD or Flux marker is on the Deployment.
pub fn warning(d: &Deployment) -> Option<String> {
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let ns = d.metadata.namespace.as_deref().unwrap_or("default");
    let label = |k: &str| d.metadata.labels.as_ref().and_then(|l| l.get(k)).cloned();
    let annotation = |k: &str| d.metadata.annotations.as_ref().and_then(|a| a.get(k)).cloned();

    if let Some(app) = annotation("argocd.argoproj.io/tracking-id")
        .map(|id| id.split(':').next().unwrap_or_default().to_owned())
        .or_else(|| label("argocd.argoproj.io/instance"))
    {
        return Some(format!(
            "deployment/{name} is managed by the Argo CD application {app:?}: with self-heal on, Argo CD reverts \
             the swap at its next sync (the agent pod is replaced by your app again) and marks the application OutOfSync. \
             Pause it first: `argocd app set {app} --sync-policy none` (turn it back on after the session)"
        ));
    }
    for kind in ["kustomize", "helm"] {
        if let Some(owner) = label(&format!("{kind}.toolkit.fluxcd.io/name")) {
            let owner_ns = label(&format!("{kind}.toolkit.fluxcd.io/namespace")).unwrap_or_else(|| ns.to_owned());
            let what = if kind == "kustomize" { "kustomization" } else { "helmrelease" };
            return Some(format!(
                "deployment/{name} is managed by the Flux {what} {owner_ns}/{owner}: at its next reconciliation \
                 Flux reverts the swap. Pause it first: `flux suspend {what} {owner} -n {owner_ns}` \
                 (and `flux resume {what} {owner} -n {owner_ns}` after the session)"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Deployment {
        serde_json::from_str(
            &std::fs::read_to_string(format!("{}/src/swap/testdata/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn names_the_controller_and_the_pause_command() {
        assert_eq!(warning(&fixture("hello")), None);
        let argo = warning(&fixture("shop")).unwrap();
        assert!(
            argo.contains("Argo CD application \"shop\"") && argo.contains("argocd app set shop --sync-policy none"),
            "{argo}"
        );
        let flux = warning(&fixture("pair")).unwrap();
        assert!(flux.contains("flux suspend kustomization apps -n flux-system"), "{flux}");
    }
}
