//! `pods/portforward` over the websocket channel protocol kube-rs speaks:
//! per requested port a data channel (2i) and an error channel (2i+1), each
//! opened by a frame carrying the port (little endian); bytes are relayed to
//! a TCP connection the node opens into the pod.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};

use super::super::App;
use super::super::handlers::Query;
use super::super::path::Target;
use super::super::status::{ApiError, ApiResult};
use super::channel::{self, Frame};
use crate::node::{Node, PodRef};

/// `ports=80,1234` (also repeated `ports=` keys joined by the caller).
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let ports: Result<Vec<u16>, _> = s.split(',').map(|p| p.trim().parse::<u16>()).collect();
    match ports {
        Ok(p) if !p.is_empty() && !p.contains(&0) => Ok(p),
        _ => Err(format!("invalid port in {s:?}")),
    }
}

pub async fn serve(app: Arc<App>, t: Target, q: Query, ws: WebSocketUpgrade) -> ApiResult<Response> {
    let ns = t.namespace.clone().unwrap_or_default();
    let name = t.name.clone().unwrap_or_default();
    app.registry.get(t.res, &ns, &name)?;
    let ports = parse_ports(q.get("ports").map_or("", String::as_str)).map_err(ApiError::bad_request)?;
    let node = app
        .node
        .get()
        .cloned()
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} is not running: the sandbox node is not up")))?;
    let pod = PodRef { namespace: ns, name };
    let cut = app.cut_streams.subscribe();
    Ok(ws
        .protocols([channel::V5, channel::V4, "portforward.k8s.io"])
        .on_upgrade(move |s| run(s, node, pod, ports, cut)))
}

fn binary(ch: u8, data: &[u8]) -> Message {
    Message::Binary(channel::encode(ch, data).into())
}

/// Relays until every port's connection ended, the client closed, or `cut`
/// changed (the server drops the stream, see `App::cut_streams`).
async fn run(socket: WebSocket, node: Arc<dyn Node>, pod: PodRef, ports: Vec<u16>, mut cut: watch::Receiver<u64>) {
    let v5 = socket.protocol().is_some_and(|p| p == channel::V5);
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let (done_tx, mut done_rx) = mpsc::channel::<()>(ports.len());
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::new();
    let mut readers = Vec::new();
    let mut open = 0usize;
    for (i, port) in ports.iter().enumerate() {
        let (data_ch, err_ch) = (2 * i as u8, 2 * i as u8 + 1);
        let _ = tx.send(binary(data_ch, &port.to_le_bytes())).await;
        let _ = tx.send(binary(err_ch, &port.to_le_bytes())).await;
        match node.connect(&pod, *port).await {
            Ok(stream) => {
                let (mut r, w) = stream.into_split();
                writers.push(Some(w));
                open += 1;
                let (tx, done) = (tx.clone(), done_tx.clone());
                readers.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || tx.send(binary(data_ch, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                    let _ = done.send(()).await;
                }));
            }
            Err(e) => {
                writers.push(None);
                let msg = format!("error forwarding port {port} to pod {}: {e}", pod.name);
                let _ = tx.send(binary(err_ch, msg.as_bytes())).await;
            }
        }
    }
    while open > 0 {
        tokio::select! {
            msg = incoming.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => match channel::decode(&bytes, v5) {
                    Some(Frame::Data { channel, data }) if channel % 2 == 0 && !data.is_empty() => {
                        if let Some(Some(w)) = writers.get_mut(usize::from(channel / 2))
                            && w.write_all(data).await.is_err()
                        {
                            writers[usize::from(channel / 2)] = None;
                        }
                    }
                    Some(Frame::Close { channel }) => {
                        if let Some(slot) = writers.get_mut(usize::from(channel / 2))
                            && let Some(mut w) = slot.take()
                        {
                            let _ = w.shutdown().await;
                        }
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            Some(()) = done_rx.recv() => open -= 1,
            Ok(()) = cut.changed() => {
                tracing::info!(pod = %pod.name, "cutting a port-forward stream");
                break;
            }
        }
    }
    for r in readers {
        r.abort();
    }
    let _ = tx.send(channel::normal_close()).await;
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_query() {
        assert_eq!(parse_ports("80,1234"), Ok(vec![80, 1234]));
        assert!(parse_ports("").is_err());
        assert!(parse_ports("80,x").is_err());
        assert!(parse_ports("0").is_err());
    }
}
