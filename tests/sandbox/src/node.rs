//! The seam between the API server and the kubelet.
//!
//! The kubelet reconciles pods by talking to the API server like a real
//! kubelet does (kube-rs over loopback HTTP). The pod subresources that stream
//! (`log`, `exec`, `portforward`) go the other way, and the API server reaches
//! the node through this trait, as kube-apiserver proxies to the kubelet.

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A pod on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// Query options of `pods/log` that the node honours.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub tail_lines: Option<i64>,
    pub timestamps: bool,
}

/// What `pods/exec` asks to run.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A running exec: the API server pumps its streams to and from the client's
/// websocket channels and reports the exit code on the error channel.
pub struct ExecSession {
    pub stdin: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    pub stdout: Option<Pin<Box<dyn AsyncRead + Send>>>,
    pub stderr: Option<Pin<Box<dyn AsyncRead + Send>>>,
    /// Terminal size changes (columns, rows) when `tty` is set.
    pub resize: Option<tokio::sync::mpsc::Sender<(u16, u16)>>,
    /// Resolves to the command's exit code once it ends.
    pub exit: tokio::sync::oneshot::Receiver<i64>,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The pod or container is not on this node (maps to 404).
    #[error("{0} not found")]
    NotFound(String),
    /// The pod exists but cannot serve the request yet (maps to 400, as the
    /// real API says "container is waiting to start").
    #[error("{0}")]
    NotReady(String),
    #[error("container runtime: {0}")]
    Runtime(String),
}

/// What the API server needs from the node.
#[async_trait]
pub trait Node: Send + Sync + 'static {
    async fn logs(&self, pod: &PodRef, container: &str, opts: LogOptions) -> Result<ByteStream, NodeError>;
    async fn exec(&self, pod: &PodRef, container: &str, req: ExecRequest) -> Result<ExecSession, NodeError>;
    async fn connect(&self, pod: &PodRef, port: u16) -> Result<TcpStream, NodeError>;
}
