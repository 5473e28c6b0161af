//! `tpd env deployment/NAME[:CONTAINER] --format dotenv|json|compose|docker
//! [--out FILE]`: the env the container gets in the cluster, for IDEs and
//! scripts. Written files are mode 0600; values never reach the logs.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};
use kube::api::{Api, ListParams};

use crate::cli::{EnvArgs, GlobalArgs};
use crate::cluster::{self, Cluster};
use crate::error::Hint;
use crate::remote_env::{self, Sources};
use crate::session::env::render;
use crate::swap::{plan, record::Record};

pub async fn run(global: &GlobalArgs, args: &EnvArgs) -> anyhow::Result<ExitCode> {
    let cluster = crate::session::cluster(global).await?;
    let ns = &cluster.namespace;
    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), ns);
    let d = crate::rollout::get(&deployments, ns, &args.target.name).await?;
    let index = plan::choose_container(&d, args.target.container.as_deref())?;
    // A swapped Deployment runs the agent; its record keeps the app's container.
    let container = match Record::read(&d)? {
        Some(record) => record.original.container,
        None => d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .map(|p| p.containers[index].clone())
            .unwrap_or_default(),
    };
    let pod = running_pod(&cluster, &d).await?;
    let sources = sources(&cluster, &container).await?;
    let env = remote_env::resolve(&pod, &container, &sources).map_err(|e| {
        Hint::new(
            format!("cannot compute the env of {}: {e}", args.target),
            format!("check with `kubectl describe pod -n {ns}`"),
        )
    })?;
    let text = render(&env, args.format)?;
    match &args.out {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            // An existing file keeps its mode on open: tighten it too.
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            file.write_all(text.as_bytes())?;
            eprintln!("wrote {} variables to {} (mode 0600)", env.len(), path.display());
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A Running pod of the Deployment: the downward API refers to a real pod.
async fn running_pod(cluster: &Cluster, d: &Deployment) -> anyhow::Result<Pod> {
    let name = d.metadata.name.clone().unwrap_or_default();
    let labels = d.spec.as_ref().and_then(|s| s.selector.match_labels.clone()).unwrap_or_default();
    let selector = labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let list =
        pods.list(&ListParams::default().labels(&selector)).await.context("cannot list the Deployment's pods")?;
    list.items
        .into_iter()
        .find(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .ok_or_else(|| {
            Hint::new(
                format!("deployment/{name} has no running pod to read the env of"),
                format!("check it with `kubectl rollout status deployment/{name} -n {}`", cluster.namespace),
            )
            .into()
        })
}

/// The ConfigMaps and Secrets the container names, and the Services whose
/// links the kubelet injects.
async fn sources(cluster: &Cluster, c: &Container) -> anyhow::Result<Sources> {
    let (mut cms, mut secrets) = (BTreeSet::new(), BTreeSet::new());
    for from in c.env_from.iter().flatten() {
        cms.extend(from.config_map_ref.as_ref().map(|r| r.name.clone()));
        secrets.extend(from.secret_ref.as_ref().map(|r| r.name.clone()));
    }
    for var in c.env.iter().flatten().filter_map(|v| v.value_from.as_ref()) {
        cms.extend(var.config_map_key_ref.as_ref().map(|r| r.name.clone()));
        secrets.extend(var.secret_key_ref.as_ref().map(|r| r.name.clone()));
    }
    let client = &cluster.client;
    let ns = &cluster.namespace;
    let mut sources = Sources::default();
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for name in cms {
        if let Some(cm) = get_opt(&cm_api, &name).await? {
            sources.config_maps.insert(name, cm);
        }
    }
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for name in secrets {
        if let Some(s) = get_opt(&secret_api, &name).await? {
            sources.secrets.insert(name, s);
        }
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    sources.services = services.list(&ListParams::default()).await.context("cannot list services")?.items;
    if ns != "default" {
        let default: Api<Service> = Api::namespaced(client.clone(), "default");
        sources.services.extend(get_opt(&default, "kubernetes").await?);
    }
    Ok(sources)
}

async fn get_opt<K>(api: &Api<K>, name: &str) -> anyhow::Result<Option<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(obj) => Ok(Some(obj)),
        Err(e) if cluster::is_not_found(&e) => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot read {name}"))),
    }
}
