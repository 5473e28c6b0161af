//! `tpd restore deployment/NAME` and `tpd restore --all [-A]`: put swapped
//! and intercepted Deployments back by hand, whoever holds them (their
//! sessions then end when they next renew their lease).

use std::process::ExitCode;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams};

use crate::cli::{GlobalArgs, RestoreArgs};
use crate::intercept;
use crate::swap::apply::{self, Restored};
use crate::swap::record::Record;

pub async fn run(global: &GlobalArgs, args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let cluster = crate::session::cluster(global).await?;
    let targets: Vec<(String, String)> = match &args.target {
        Some(t) => vec![(cluster.namespace.clone(), t.name.clone())],
        None => {
            let api: Api<Deployment> = if args.all_namespaces {
                Api::all(cluster.client.clone())
            } else {
                Api::namespaced(cluster.client.clone(), &cluster.namespace)
            };
            api.list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|d| {
                    matches!(Record::read(d), Ok(Some(_))) || matches!(intercept::record::Record::read(d), Ok(Some(_)))
                })
                .map(|d| (d.metadata.namespace.unwrap_or_default(), d.metadata.name.unwrap_or_default()))
                .collect()
        }
    };
    if targets.is_empty() {
        println!("no swapped or intercepted deployments");
    }
    for (ns, name) in targets {
        let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &ns);
        match apply::restore(&api, &ns, &name, None).await? {
            Restored::Done { holder } => {
                println!("restored deployment/{name} in {ns} (was swapped by {holder})")
            }
            Restored::NotSwapped | Restored::TakenOver { .. } => {
                match intercept::end::restore_by_hand(&cluster.client, &ns, &name).await? {
                    Some(holders) if holders.is_empty() => {
                        println!("restored deployment/{name} in {ns} (was intercepted)")
                    }
                    Some(holders) => {
                        println!("restored deployment/{name} in {ns} (was intercepted by {})", holders.join(", "))
                    }
                    None => println!("deployment/{name} in {ns} is neither swapped nor intercepted"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
