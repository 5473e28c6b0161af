//! Reading a Deployment, asking whether its pods would be admitted, and
//! watching its rollout and pods: what a swap and an intercept share (each
//! decides for itself what to change).

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

use crate::error::Hint;
use crate::swap::plan::Target;

/// Reads a Deployment, turning 404 into a message that says where we looked.
pub async fn get(api: &Api<Deployment>, namespace: &str, name: &str) -> anyhow::Result<Deployment> {
    match api.get(name).await {
        Ok(d) => Ok(d),
        Err(e) if crate::cluster::is_not_found(&e) => Err(Hint::new(
            format!("there is no deployment/{name} in namespace {namespace:?}"),
            format!("list them with `kubectl get deployments -n {namespace}`, or pick the namespace with -n"),
        )
        .into()),
        Err(e) => Err(e).with_context(|| format!("cannot read deployment/{name} in namespace {namespace:?}")),
    }
}

/// Asks the API server whether it would admit the agent's pod (a dry-run
/// create of the planned template) before the Deployment changes: the swap
/// replaces the running pods first, so a namespace whose Pod Security
/// refuses the agent would otherwise be found out with the app already
/// stopped. Any other answer (no right to create pods, say) leaves the
/// decision to the ReplicaSet, whose pods the caller watches. `help`
/// says what to do when it would not.
pub async fn admit_agent_pod(
    api: &Api<Deployment>,
    namespace: &str,
    target: &Target,
    planned: &Deployment,
    help: String,
) -> anyhow::Result<()> {
    let template = planned.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    let mut metadata = template.metadata.unwrap_or_default();
    metadata.generate_name = Some(format!("{}-tpd-admission-", target.name));
    metadata.namespace = Some(namespace.to_owned());
    let pod = Pod { metadata, spec: template.spec, ..Pod::default() };
    let pods: Api<Pod> = Api::namespaced(api.clone().into_client(), namespace);
    match pods.create(&PostParams { dry_run: true, ..PostParams::default() }, &pod).await {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("violates PodSecurity") => {
            Err(Hint::new(format!("namespace {namespace:?} refuses the agent pod: {}", s.message), help).into())
        }
        Err(e) => {
            tracing::debug!("the dry run of the agent pod did not answer the question, going on: {e}");
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}

/// Whether the Deployment runs its latest template on every replica, all available.
pub fn rolled_out(d: &Deployment) -> bool {
    let (Some(spec), Some(status)) = (&d.spec, &d.status) else {
        return false;
    };
    let want = spec.replicas.unwrap_or(1);
    status.observed_generation >= d.metadata.generation
        && status.updated_replicas.unwrap_or(0) == want
        && status.available_replicas.unwrap_or(0) == want
        && status.replicas.unwrap_or(0) == want
}

/// Whether a container waits because the kubelet cannot pull its image:
/// waiting longer will not help.
pub fn is_pull_failure(waiting_reason: &str) -> bool {
    matches!(waiting_reason, "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName")
}

/// Whether the pod runs and its readiness says so.
pub fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Why a Deployment's ReplicaSet cannot create pods, as its `ReplicaFailure`
/// condition says (the API server's refusal, e.g. Pod Security's).
pub fn replica_failure(d: &Deployment) -> Option<String> {
    let conditions = d.status.as_ref()?.conditions.as_ref()?;
    let failed = conditions.iter().find(|c| c.type_ == "ReplicaFailure" && c.status == "True")?;
    Some(failed.message.clone().unwrap_or_else(|| failed.reason.clone().unwrap_or_default()))
}

/// A JSON patch whose `test` failed, or a stale write.
pub fn conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409 || status.code == 422)
}
