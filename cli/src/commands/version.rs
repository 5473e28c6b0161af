//! `tpd version`: the client's version and what the configured images say
//! about themselves.

use std::process::ExitCode;

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{LogsOptions, RemoveContainerOptions};
use futures::StreamExt;

use crate::cli::GlobalArgs;
use crate::config::{self, Images};
use crate::docker;
use crate::output::OutputFormat;

pub async fn run(args: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let images = Images::resolve(args, &config::load()?);
    let (sidecar, agent) = match docker::connect().await {
        Ok(docker) => (image_version(&docker, &images.sidecar).await, image_version(&docker, &images.agent).await),
        Err(hint) => {
            let why = format!("unknown ({})", hint.message);
            (why.clone(), why)
        }
    };
    if args.output == OutputFormat::Json {
        let doc = serde_json::json!({
            "client": tpd_wire::VERSION,
            "protocol": tpd_wire::names::PROTOCOL_VERSION,
            "sidecar": { "image": images.sidecar, "version": sidecar },
            "agent": { "image": images.agent, "version": agent },
        });
        println!("{doc}");
    } else {
        println!("tpd      {} (protocol {})", tpd_wire::VERSION, tpd_wire::names::PROTOCOL_VERSION);
        println!("sidecar  {sidecar}  [{}]", images.sidecar);
        println!("agent    {agent}  [{}]", images.agent);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `IMAGE --version` in a throwaway container; the images are tiny
/// scratch images, so this takes well under a second.
async fn image_version(docker: &Docker, image: &str) -> String {
    match run_version(docker, image).await {
        Ok(out) => out.split_whitespace().last().unwrap_or("?").to_string(),
        Err(e) if docker::is_not_found(&e) => "not present locally (`tpd doctor` says how to get it)".into(),
        Err(e) => format!("unknown ({e})"),
    }
}

async fn run_version(docker: &Docker, image: &str) -> Result<String, bollard::errors::Error> {
    let body =
        ContainerCreateBody { image: Some(image.into()), cmd: Some(vec!["--version".into()]), ..Default::default() };
    let id = docker.create_container(None, body).await?.id;
    let result = async {
        docker.start_container(&id, None).await?;
        let _ = docker.wait_container(&id, None).next().await;
        let logs = LogsOptions { stdout: true, ..Default::default() };
        let out: Vec<String> =
            docker.logs(&id, Some(logs)).filter_map(|l| async { l.ok().map(|l| l.to_string()) }).collect().await;
        Ok(out.concat())
    }
    .await;
    let _ = docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
    result
}
