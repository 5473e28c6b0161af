//! `tpd-sandbox`: a Kubernetes API server whose pods are Docker containers.
//! Test infrastructure for tpd: faithful enough that kubectl and kube-rs
//! cannot tell it from a small cluster for what tpd and a developer do.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod api;
mod controllers;
mod instance;
mod kubelet;
mod layout;
mod network;
mod node;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::instance::Instance;

#[derive(Debug, Parser)]
#[command(name = "tpd-sandbox", version, about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the sandbox in the background, write a kubeconfig and print its path.
    Up {
        #[arg(long, default_value = layout::DEFAULT_NAME)]
        name: String,
        /// Where to write the kubeconfig (default: the instance's state dir).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Say whether the sandbox runs (exit code 1 if not).
    Status {
        #[arg(long, default_value = layout::DEFAULT_NAME)]
        name: String,
    },
    /// Stop the sandbox and remove every container, network, volume and file it made.
    Down {
        #[arg(long, default_value = layout::DEFAULT_NAME)]
        name: String,
    },
    /// Run the API server, controllers and node in the foreground (what `up` starts).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value = layout::DEFAULT_NAME)]
        name: String,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TPD_SANDBOX_LOG").unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::io::stderr).init();
}

/// Errors print as one `error: ...` chain, without a backtrace even under
/// RUST_BACKTRACE, so `up` can quote the server log's last lines usefully.
fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match args.command {
        Cmd::Up { name, kubeconfig } => {
            init_logging("warn");
            Instance::new(&name)?.up(kubeconfig)
        }
        Cmd::Status { name } => {
            if !Instance::new(&name)?.status() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Down { name } => {
            init_logging("warn");
            rt.block_on(Instance::new(&name)?.down())
        }
        Cmd::Serve { name } => {
            init_logging("info");
            rt.block_on(serve(Instance::new(&name)?))
        }
    }
}

/// SIGTERM and SIGINT cancel the one shutdown token.
fn cancel_on_signals(shutdown: CancellationToken) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    Ok(())
}

/// SIGUSR1 closes every open pods/portforward stream (a test's
/// `Sandbox::cut_streams`), as a real cluster drops long-lived connections.
fn cut_streams_on_sigusr1(cut: tokio::sync::watch::Sender<u64>) -> Result<()> {
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            tracing::info!(streams = cut.receiver_count(), "SIGUSR1: closing every port-forward stream");
            cut.send_modify(|n| *n += 1);
        }
    });
    Ok(())
}

async fn serve(inst: Instance) -> Result<()> {
    std::fs::create_dir_all(&inst.dir).with_context(|| format!("creating {}", inst.dir.display()))?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;

    let listener = api::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.context("binding the API port")?;
    let port = listener.local_addr()?.port();
    let ca = api::tls::ClusterCa::new(&[
        layout::KUBERNETES_SERVICE_IP.into(),
        layout::NETWORK_GATEWAY.into(),
        std::net::Ipv4Addr::LOCALHOST.into(),
    ])?;
    let registry = Arc::new(api::registry::Registry::new(Arc::new(store::Store::new())));
    controllers::bootstrap::run(&registry, layout::API_SECURE_PORT);
    let app = Arc::new(api::App {
        registry: registry.clone(),
        node: OnceLock::new(),
        address: format!("127.0.0.1:{port}"),
        cut_streams: tokio::sync::watch::Sender::new(0),
        tokens: Arc::default(),
    });
    cut_streams_on_sigusr1(app.cut_streams.clone())?;
    let server = tokio::spawn(api::serve(listener, app.clone(), shutdown.clone()));
    let controllers = controllers::spawn(registry, ca.ca_pem.clone(), shutdown.clone());
    tracing::info!(port, "API server listening");

    // `up` returns once the port file exists: only write it when pods can
    // run, so a broken node is an error at `up`, not a hang in the first rollout.
    let client = kube_client(port)?;
    let mut secure_server = None;
    let node_cfg = kubelet::NodeConfig { instance: inst.name.clone(), state_dir: inst.dir.clone() };
    let started = match kubelet::start(node_cfg, client, shutdown.clone()).await {
        Ok(node) => {
            let _ = app.node.set(node);
            tracing::info!("sandbox node started");
            match serve_secure_port(&ca, app.clone(), shutdown.clone()).await {
                Ok(handle) => {
                    secure_server = Some(handle);
                    inst.write_ready(port)
                }
                Err(e) => {
                    shutdown.cancel();
                    Err(e)
                }
            }
        }
        Err(e) => {
            tracing::error!("the sandbox node did not start, pods cannot run: {e:#}");
            shutdown.cancel();
            Err(e.context("starting the sandbox node"))
        }
    };

    if started.is_ok() {
        shutdown.cancelled().await;
    }
    // Open watches would hold a graceful shutdown for their whole timeout: cap it.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some(secure) = secure_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), secure).await;
    }
    let _ = controllers.await;
    inst.clear_ready();
    started
}

/// Serves the secure port (the `kubernetes` Service's endpoint) on the node
/// network's gateway, which exists once the node has made the network.
async fn serve_secure_port(
    ca: &api::tls::ClusterCa,
    app: Arc<api::App>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let secure = SocketAddr::from((layout::NETWORK_GATEWAY, layout::API_SECURE_PORT));
    let tcp = api::bind(secure).await.with_context(|| format!("binding the API server's secure port {secure}"))?;
    tracing::info!(%secure, "secure port listening");
    Ok(tokio::spawn(api::serve_secure(ca.listener(tcp), app, shutdown)))
}

/// The kube-rs client the node uses to talk to this server.
fn kube_client(port: u16) -> Result<kube::Client> {
    let url = format!("http://127.0.0.1:{port}").parse().context("the API URL")?;
    kube::Client::try_from(kube::Config::new(url)).context("building the node's API client")
}
