//! `tpd status [-A] [--output json]`: this machine's sessions (their local
//! containers) and every swap in the namespace, with holder and lease.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bollard::query_parameters::ListContainersOptions;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use serde::Serialize;
use tpd_wire::names;

use crate::cli::{GlobalArgs, StatusArgs};
use crate::output::OutputFormat;
use crate::session::transport::Used;
use crate::swap::record::Record;

#[derive(Debug, Serialize)]
struct Swap {
    namespace: String,
    deployment: String,
    container: String,
    session: String,
    holder: String,
    since: String,
    lease_expires: String,
    lease_live: bool,
}

#[derive(Debug, Serialize)]
struct LocalSession {
    session: String,
    containers: Vec<String>,
    /// What carries the session's WireGuard (`udp` or `portforward`), once it is ready.
    transport: Option<Used>,
}

pub async fn run(global: &GlobalArgs, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let cluster = crate::session::cluster(global).await?;
    let api: Api<Deployment> = if args.all_namespaces {
        Api::all(cluster.client.clone())
    } else {
        Api::namespaced(cluster.client.clone(), &cluster.namespace)
    };
    let now = Timestamp::now();
    let swaps: Vec<Swap> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|d| {
            let r = Record::read(&d).ok()??;
            Some(Swap {
                namespace: d.metadata.namespace.unwrap_or_default(),
                deployment: d.metadata.name.unwrap_or_default(),
                container: r.original.container.name.clone(),
                lease_expires: r.expires().to_string(),
                lease_live: r.expires() > now,
                session: r.session,
                holder: r.holder,
                since: r.since.0.to_string(),
            })
        })
        .collect();
    // Docker unreachable: no local sessions to list, and the text output says why.
    let (local, local_error) = match local_sessions().await {
        Ok(list) => (list, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let connect = crate::session::named::summaries();

    if global.output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::json!({ "context": cluster.context, "sessions": local, "connect": connect, "swaps": swaps })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("tpd connect sessions:");
    if connect.is_empty() {
        println!("  none");
    }
    connect.iter().for_each(|s| println!("  {s}"));
    println!("sessions on this machine:");
    match (&local, &local_error) {
        (_, Some(e)) => println!("  unknown ({e})"),
        (list, None) if list.is_empty() => println!("  none"),
        (list, None) => list.iter().for_each(|s| {
            let transport = s.transport.map_or_else(|| "not ready".to_owned(), |t| t.to_string());
            println!("  {}  transport: {transport}  containers: {}", s.session, s.containers.join(", "));
        }),
    }
    let scope =
        if args.all_namespaces { "all namespaces".to_owned() } else { format!("namespace {}", cluster.namespace) };
    println!("swapped deployments in {scope}:");
    if swaps.is_empty() {
        println!("  none");
    }
    for s in &swaps {
        let lease = if s.lease_live {
            format!("lease until {}", s.lease_expires)
        } else {
            format!("lease EXPIRED at {}", s.lease_expires)
        };
        println!(
            "  {}/deployment/{}:{}  held by {} since {}  session {}  {lease}",
            s.namespace, s.deployment, s.container, s.holder, s.since, s.session
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Local containers tpd started, grouped by session.
async fn local_sessions() -> Result<Vec<LocalSession>, String> {
    let docker = crate::docker::connect().await.map_err(|h| h.message)?;
    let filters = [("label".to_owned(), vec![format!("{}={}", names::LABEL_MANAGED_BY, names::MANAGED_BY_VALUE)])]
        .into_iter()
        .collect();
    let list = docker
        .list_containers(Some(ListContainersOptions { filters: Some(filters), ..Default::default() }))
        .await
        .map_err(|e| e.to_string())?;
    let mut by_session: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in list {
        let session = c.labels.as_ref().and_then(|l| l.get(names::LABEL_SESSION)).cloned().unwrap_or_default();
        let name =
            c.names.unwrap_or_default().first().map(|n| n.trim_start_matches('/').to_owned()).unwrap_or_default();
        by_session.entry(session).or_default().push(name);
    }
    Ok(by_session
        .into_iter()
        .map(|(session, containers)| {
            let transport =
                crate::session::sidecar::transport_in(&crate::session::session_dir_path(&session)).map(Used::from);
            LocalSession { session, containers, transport }
        })
        .collect())
}
