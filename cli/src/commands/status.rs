//! `tpd status [-A] [--output json]`: this machine's sessions (their local
//! containers) and every swap and intercept in the namespace, with holder
//! and lease.

use std::collections::BTreeMap;
use std::process::ExitCode;

use bollard::query_parameters::ListContainersOptions;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use serde::Serialize;
use tpd_wire::names;

use crate::cli::{GlobalArgs, StatusArgs};
use crate::intercept::{self, record::Entry};
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

/// One session's intercept of a Deployment.
#[derive(Debug, PartialEq, Serialize)]
struct Intercept {
    namespace: String,
    deployment: String,
    container: String,
    ports: Vec<u16>,
    /// As the user wrote it: `x-dev=alice path=/api*`.
    filter: String,
    /// Copies, not requests (`--mirror`); bodies cut past `mirror_body_limit`.
    mirror: bool,
    mirror_body_limit: Option<u64>,
    /// Requests (or copies) sent to the session in the last minute, and
    /// copies answered and dropped, as of the session's last renewal.
    last_minute: u64,
    mirrored: u64,
    dropped: u64,
    headers: BTreeMap<String, String>,
    baggage: BTreeMap<String, String>,
    path_prefix: Option<String>,
    session: String,
    holder: String,
    since: String,
    lease_expires: String,
    lease_live: bool,
}

/// Every session entry of an intercepted Deployment.
fn intercepts_of(d: &Deployment, now: Timestamp) -> Vec<Intercept> {
    let Ok(Some(record)) = intercept::record::Record::read(d) else {
        return Vec::new();
    };
    let namespace = d.metadata.namespace.clone().unwrap_or_default();
    let deployment = d.metadata.name.clone().unwrap_or_default();
    Entry::all(d)
        .into_iter()
        .map(|e| Intercept {
            namespace: namespace.clone(),
            deployment: deployment.clone(),
            container: record.container.clone(),
            ports: e.ports.clone(),
            filter: e.filter.to_string(),
            mirror: e.mirror.is_some(),
            mirror_body_limit: e.mirror.map(|m| m.body_limit),
            last_minute: e.traffic.last_minute,
            mirrored: e.traffic.mirrored,
            dropped: e.traffic.dropped,
            lease_expires: e.expires().to_string(),
            lease_live: e.expires() > now,
            headers: e.filter.headers,
            baggage: e.filter.baggage,
            path_prefix: e.filter.path_prefix,
            session: e.session,
            holder: e.holder,
            since: e.since.0.to_string(),
        })
        .collect()
}

/// `ns/deployment/api:api  port 8080  x-dev=alice  12 in the last minute  held by ... since ...  session ...  lease ...`
fn intercept_line(i: &Intercept, now: Timestamp) -> String {
    let ports = i.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let lease = match i.lease_expires.parse::<Timestamp>() {
        Ok(at) if i.lease_live => format!("lease {} s left", at.duration_since(now).as_secs()),
        _ => format!("lease EXPIRED at {}", i.lease_expires),
    };
    let takes = match (i.mirror, i.filter.is_empty()) {
        (false, _) => format!("{}  {} in the last minute", i.filter, i.last_minute),
        (true, every) => format!(
            "mirror of {}  {} in the last minute, {} copied, {} dropped",
            if every { "every request" } else { &i.filter },
            i.last_minute,
            i.mirrored,
            i.dropped
        ),
    };
    format!(
        "{}/deployment/{}:{}  port {ports}  {takes}  held by {} since {}  session {}  {lease}",
        i.namespace, i.deployment, i.container, i.holder, i.since, i.session
    )
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
    let deployments = api.list(&ListParams::default()).await?.items;
    let intercepts: Vec<Intercept> = deployments.iter().flat_map(|d| intercepts_of(d, now)).collect();
    let swaps: Vec<Swap> = deployments
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
            serde_json::json!({
                "context": cluster.context,
                "sessions": local,
                "connect": connect,
                "swaps": swaps,
                "intercepts": intercepts,
            })
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
    println!("intercepts in {scope}:");
    if intercepts.is_empty() {
        println!("  none");
    }
    intercepts.iter().for_each(|i| println!("  {}", intercept_line(i, now)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::record::{ANNOTATION, entry_key};
    use tpd_wire::intercept::{Config, Filter};

    #[test]
    fn every_session_of_an_intercept_is_listed_with_its_lease() {
        let record = intercept::record::Record {
            version: 1,
            container: "api".into(),
            config: Config { transport: 7700, intercept: 7701, ports: vec![] },
            services: Default::default(),
        };
        let at: Timestamp = "2026-12-07T10:02:00Z".parse().unwrap();
        let filter = Filter {
            headers: [("x-dev".into(), "alice".into())].into(),
            path_prefix: Some("/api".into()),
            ..Filter::default()
        };
        let alice = Entry::new("s-a", "alice@laptop", at, &[8080], &filter);
        let mut d = Deployment::default();
        d.metadata.name = Some("api".into());
        d.metadata.namespace = Some("shop".into());
        d.metadata.annotations = Some(
            [
                (ANNOTATION.to_owned(), record.to_annotation()),
                (entry_key("s-a"), crate::swap::lease::Leased::to_annotation(&alice)),
            ]
            .into(),
        );
        let now = at + k8s_openapi::jiff::SignedDuration::from_secs(5);
        let listed = intercepts_of(&d, now);
        assert_eq!(listed.len(), 1);
        let i = &listed[0];
        assert_eq!((i.deployment.as_str(), i.container.as_str(), i.ports.as_slice()), ("api", "api", &[8080][..]));
        assert_eq!(i.filter, "x-dev=alice path=/api*");
        assert!(i.lease_live);
        assert_eq!(
            intercept_line(i, now),
            "shop/deployment/api:api  port 8080  x-dev=alice path=/api*  0 in the last minute  held by alice@laptop \
             since 2026-12-07T10:02:00Z  session s-a  lease 10 s left"
        );
        let json = serde_json::to_value(i).unwrap();
        assert_eq!(json["headers"]["x-dev"], "alice");
        assert_eq!(json["path_prefix"], "/api");
        let later = at + k8s_openapi::jiff::SignedDuration::from_secs(60);
        let expired = &intercepts_of(&d, later)[0];
        assert!(!expired.lease_live);
        assert!(intercept_line(expired, later).ends_with("lease EXPIRED at 2026-12-07T10:02:15Z"));
        assert!(intercepts_of(&Deployment::default(), now).is_empty());
        // A mirror, with what its last renewal wrote.
        let mut carol = Entry::new("s-c", "carol@box", at, &[8080], &Filter::default())
            .mirroring(Some(tpd_wire::intercept::Mirror { body_limit: 1024 }));
        carol.traffic = tpd_wire::intercept::Traffic { last_minute: 40, mirrored: 200, dropped: 3, tls_ports: vec![] };
        let annotations = d.metadata.annotations.get_or_insert_default();
        annotations.insert(entry_key("s-c"), crate::swap::lease::Leased::to_annotation(&carol));
        let listed = intercepts_of(&d, now);
        let c = listed.iter().find(|i| i.session == "s-c").unwrap();
        assert!(
            intercept_line(c, now)
                .contains("port 8080  mirror of every request  40 in the last minute, 200 copied, 3 dropped")
        );
        let json = serde_json::to_value(c).unwrap();
        assert_eq!((json["mirror"].as_bool(), json["mirror_body_limit"].as_u64()), (Some(true), Some(1024)));
        assert_eq!((json["mirrored"].as_u64(), json["dropped"].as_u64()), (Some(200), Some(3)));
    }
}
