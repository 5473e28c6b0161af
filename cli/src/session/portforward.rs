//! A port-forward to one port of a pod, spoken directly over the API
//! server's WebSocket channel protocol, for the stream transport's bulk
//! traffic.
//!
//! kube-rs's `Api::portforward` reads what it sends in 4 KiB chunks, makes
//! each its own WebSocket message, and passes every message in either
//! direction through one task and a one-slot channel; through it the tunnel
//! carried 10.5 MiB/s towards the cluster. Here each direction runs on its
//! own, and a message carries whatever one read of the sidecar's socket
//! returned, up to [`CHUNK`].
//!
//! The protocol (`portforward.k8s.io`, and the `v4`/`v5.channel.k8s.io`
//! framings kube-rs asks for): every binary message starts with a channel
//! byte; the requested port's data is channel 0, its errors channel 1. The
//! server opens each channel with a message carrying the port number
//! (little endian); after that, channel 0 carries bytes and channel 1 at
//! most one error text. Channel 255 (`v5` close frames) carries nothing we
//! act on.

use bytes::{BufMut, BytesMut};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::core::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self as ws, Message};

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The largest message sent towards the pod. WireGuard frames on the stream
/// transport are up to 64 KiB; two of them per message halve the per-message
/// cost (a TLS record, a write, the API server's and kubelet's handling).
pub const CHUNK: usize = 128 * 1024;

const DATA: u8 = 0;
const ERROR: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a port-forward to pod/{pod}:{port}: {why}")]
    Open { pod: String, port: u16, why: String },
    #[error("the port-forward's WebSocket failed: {0}")]
    Socket(#[from] ws::Error),
    #[error("the local end of the port-forward failed: {0}")]
    Local(#[from] std::io::Error),
    #[error("the API server could not forward to the pod: {0}")]
    Pod(String),
    #[error("the API server broke the port-forward protocol: {0}")]
    Protocol(String),
}

/// Bytes carried each way by one port-forward.
#[derive(Debug, Default, Clone, Copy)]
pub struct Carried {
    pub up: u64,
    pub down: u64,
}

/// An open port-forward to `pod:port`.
pub struct PortForward {
    socket: Socket,
    port: u16,
}

impl std::fmt::Debug for PortForward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortForward").field("port", &self.port).finish_non_exhaustive()
    }
}

/// Asks the API server for a port-forward to `pod:port` in `namespace`.
pub async fn open(client: &kube::Client, namespace: &str, pod: &str, port: u16) -> Result<PortForward, Error> {
    let open_err = |e: kube::Error| Error::Open { pod: pod.to_owned(), port, why: crate::cluster::describe(&e) };
    let request = Request::new(<Pod as kube::Resource>::url_path(&(), Some(namespace)))
        .portforward(pod, &[port])
        .map_err(|e| open_err(kube::Error::BuildRequest(e)))?;
    let connection = client.connect(request).await.map_err(open_err)?;
    Ok(PortForward { socket: connection.into_stream(), port })
}

impl PortForward {
    /// Carries bytes between `local` (the sidecar's connection, or one end
    /// of an in-process pipe) and the pod's port until either side closes
    /// or fails. The caller's connection ends with it, which is how the
    /// sidecar learns to dial again.
    pub async fn relay(self, local: impl AsyncRead + AsyncWrite) -> Result<Carried, Error> {
        let (sink, stream) = self.socket.split();
        let (reader, writer) = tokio::io::split(local);
        let mut carried = Carried::default();
        let result = tokio::select! {
            r = to_pod(reader, sink, &mut carried.up) => r,
            r = from_pod(stream, writer, self.port, &mut carried.down) => r,
        };
        result.map(|()| carried)
    }
}

async fn to_pod(
    mut local: impl AsyncRead + Unpin,
    mut sink: SplitSink<Socket, Message>,
    sent: &mut u64,
) -> Result<(), Error> {
    loop {
        let mut message = BytesMut::with_capacity(1 + CHUNK);
        message.put_u8(DATA);
        let n = local.read_buf(&mut message).await?;
        if n == 0 {
            sink.send(Message::Close(None)).await?;
            return Ok(());
        }
        *sent += n as u64;
        sink.send(Message::Binary(message.freeze())).await?;
    }
}

async fn from_pod(
    mut stream: SplitStream<Socket>,
    mut local: impl AsyncWrite + Unpin,
    port: u16,
    received: &mut u64,
) -> Result<(), Error> {
    let mut opened = [false; 2];
    while let Some(message) = stream.next().await {
        let Message::Binary(bytes) = message? else {
            continue;
        };
        let Some((&channel, data)) = bytes.split_first() else {
            continue;
        };
        match channel {
            DATA | ERROR if !opened[usize::from(channel)] => {
                if data != port.to_le_bytes() {
                    return Err(Error::Protocol(format!("channel {channel} opened with {data:?}, not port {port}")));
                }
                opened[usize::from(channel)] = true;
            }
            DATA => {
                local.write_all(data).await?;
                *received += data.len() as u64;
            }
            ERROR => return Err(Error::Pod(String::from_utf8_lossy(data).into_owned())),
            _ => {}
        }
    }
    Ok(())
}
