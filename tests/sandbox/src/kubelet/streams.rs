//! The pod subresources that stream (`log`, `exec`, `portforward`), served
//! from Docker the way kube-apiserver proxies them to a kubelet.

use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use bollard::query_parameters::{LogsOptionsBuilder, ResizeExecOptionsBuilder};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::runtime::{self, LABEL_ATTEMPT, LABEL_CONTAINER, LABEL_POD_NAME, LABEL_POD_NAMESPACE, PAUSE_CONTAINER};
use crate::node::{ByteStream, ExecRequest, ExecSession, LogOptions, Node, NodeError, PodRef};

pub struct DockerNode {
    pub docker: Docker,
    pub instance: String,
}

impl DockerNode {
    /// The pod's Docker containers named `container`, newest attempt first.
    async fn instances(&self, pod: &PodRef, container: &str) -> Result<Vec<String>, NodeError> {
        let mut found = runtime::list_containers(
            &self.docker,
            &self.instance,
            &[(LABEL_POD_NAMESPACE, &pod.namespace), (LABEL_POD_NAME, &pod.name), (LABEL_CONTAINER, container)],
        )
        .await
        .map_err(|e| NodeError::Runtime(e.to_string()))?;
        let attempt = |c: &bollard::models::ContainerSummary| -> u32 {
            c.labels.as_ref().and_then(|l| l.get(LABEL_ATTEMPT)).and_then(|a| a.parse().ok()).unwrap_or(0)
        };
        found.sort_by_key(|c| std::cmp::Reverse(attempt(c)));
        Ok(found.into_iter().filter_map(|c| c.id).collect())
    }

    async fn current(&self, pod: &PodRef, container: &str) -> Result<String, NodeError> {
        self.instances(pod, container).await?.into_iter().next().ok_or_else(|| {
            NodeError::NotReady(format!(
                "container \"{container}\" in pod \"{}\" is waiting to start: ContainerCreating",
                pod.name
            ))
        })
    }

    /// The pid of the pod's pause container, which holds the pod's network namespace.
    async fn netns_pid(&self, pod: &PodRef) -> Result<i64, NodeError> {
        let pause = self.current(pod, PAUSE_CONTAINER).await?;
        let info = self.docker.inspect_container(&pause, None).await.map_err(runtime_err)?;
        info.state
            .and_then(|s| s.pid)
            .filter(|pid| *pid > 0)
            .ok_or_else(|| NodeError::NotReady(format!("pod {} is not running", pod.name)))
    }
}

fn runtime_err(e: bollard::errors::Error) -> NodeError {
    match runtime::status_of(&e) {
        Some(404) => NodeError::NotFound(e.to_string()),
        Some(409) => NodeError::NotReady(e.to_string()),
        _ => NodeError::Runtime(e.to_string()),
    }
}

#[async_trait]
impl Node for DockerNode {
    async fn logs(&self, pod: &PodRef, container: &str, opts: LogOptions) -> Result<ByteStream, NodeError> {
        let instances = self.instances(pod, container).await?;
        let id = if opts.previous {
            instances.get(1).cloned().ok_or_else(|| {
                NodeError::NotReady(format!(
                    "previous terminated container \"{container}\" in pod \"{}\" not found",
                    pod.name
                ))
            })?
        } else {
            instances.into_iter().next().ok_or_else(|| {
                NodeError::NotReady(format!(
                    "container \"{container}\" in pod \"{}\" is waiting to start: ContainerCreating",
                    pod.name
                ))
            })?
        };
        let tail = opts.tail_lines.map_or_else(|| "all".to_owned(), |n| n.max(0).to_string());
        let query = LogsOptionsBuilder::default()
            .follow(opts.follow && !opts.previous)
            .stdout(true)
            .stderr(true)
            .timestamps(opts.timestamps)
            .tail(&tail)
            .build();
        let stream = self
            .docker
            .logs(&id, Some(query))
            .map(|item| item.map(LogOutput::into_bytes).map_err(std::io::Error::other));
        Ok(Box::pin(stream))
    }

    async fn exec(&self, pod: &PodRef, container: &str, req: ExecRequest) -> Result<ExecSession, NodeError> {
        let id = self.current(pod, container).await?;
        let config = ExecConfig {
            attach_stdin: Some(req.stdin),
            attach_stdout: Some(req.stdout),
            attach_stderr: Some(req.stderr),
            tty: Some(req.tty),
            cmd: Some(req.command.clone()),
            ..Default::default()
        };
        let exec = self.docker.create_exec(&id, config).await.map_err(runtime_err)?.id;
        let start = StartExecOptions { detach: false, tty: req.tty, output_capacity: None };
        let StartExecResults::Attached { mut output, input } =
            self.docker.start_exec(&exec, Some(start)).await.map_err(runtime_err)?
        else {
            return Err(NodeError::Runtime("docker started the exec detached".into()));
        };

        // Docker multiplexes stdout and stderr on one stream (or sends raw
        // console bytes with a tty); split them into the two pipes the API
        // server pumps to the client's channels.
        let (mut out_w, out_r) = tokio::io::duplex(64 * 1024);
        let (mut err_w, err_r) = tokio::io::duplex(64 * 1024);
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
        let docker = self.docker.clone();
        let exec_id = exec.clone();
        tokio::spawn(async move {
            while let Some(Ok(chunk)) = output.next().await {
                let written = match chunk {
                    LogOutput::StdErr { message } => err_w.write_all(&message).await,
                    LogOutput::StdOut { message } | LogOutput::Console { message } => out_w.write_all(&message).await,
                    LogOutput::StdIn { .. } => Ok(()),
                };
                if written.is_err() {
                    break;
                }
            }
            drop((out_w, err_w));
            let code = docker.inspect_exec(&exec_id).await.ok().and_then(|i| i.exit_code).unwrap_or(1);
            let _ = exit_tx.send(code);
        });

        let resize = req.tty.then(|| {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(u16, u16)>(8);
            let docker = self.docker.clone();
            tokio::spawn(async move {
                while let Some((cols, rows)) = rx.recv().await {
                    let opts = ResizeExecOptionsBuilder::default().w(i32::from(cols)).h(i32::from(rows)).build();
                    if let Err(e) = docker.resize_exec(&exec, opts).await {
                        tracing::debug!(error = %e, "resizing exec tty");
                    }
                }
            });
            tx
        });

        Ok(ExecSession {
            stdin: req.stdin.then_some(input),
            stdout: req.stdout.then(|| Box::pin(out_r) as _),
            stderr: (req.stderr && !req.tty).then(|| Box::pin(err_r) as _),
            resize,
            exit: exit_rx,
        })
    }

    /// Lands on the pod's loopback, as a kubelet's port-forward does (see [`super::netns`]).
    async fn connect(&self, pod: &PodRef, port: u16) -> Result<TcpStream, NodeError> {
        let pid = self.netns_pid(pod).await?;
        let stream = super::netns::connect_loopback(pid, port)
            .await
            .map_err(|e| NodeError::Runtime(format!("connecting to 127.0.0.1:{port} in pod {}: {e}", pod.name)))?;
        // A kubelet (Go) disables Nagle on every connection; with it on, each
        // port-forwarded websocket message that ends in a partial segment
        // waits for the pod's delayed ACK (40 ms), and uploads crawl.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}
