//! `pods/exec` over the websocket channel protocol (v5, v4): stdin from the
//! client, stdout/stderr to it, terminal resizes, and the exit status as a
//! Status on the error channel.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::super::App;
use super::super::handlers::Query;
use super::super::path::Target;
use super::super::status::{ApiError, ApiResult};
use super::channel::{self, Frame};
use super::{node_error, resolve};
use crate::node::{ExecRequest, ExecSession};

fn flag(q: &Query, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

pub async fn serve(
    app: Arc<App>,
    t: Target,
    q: Query,
    command: Vec<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let target = resolve(&app, &t, &q)?;
    if command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    let req = ExecRequest {
        command: command.clone(),
        stdin: flag(&q, "stdin"),
        stdout: flag(&q, "stdout"),
        stderr: flag(&q, "stderr"),
        tty: flag(&q, "tty"),
    };
    let session = target.node.exec(&target.pod, &target.container, req).await.map_err(node_error)?;
    Ok(ws.protocols([channel::V5, channel::V4]).on_upgrade(move |socket| run(socket, session, command)))
}

/// The Status the error channel carries when the command ends.
pub fn exit_status(code: i64, command: &[String]) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", command.join(" ")),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}
    })
}

async fn copy_out(reader: Option<std::pin::Pin<Box<dyn AsyncRead + Send>>>, ch: u8, tx: mpsc::Sender<Message>) {
    let Some(mut reader) = reader else { return };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(Message::Binary(channel::encode(ch, &buf[..n]).into())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn input(
    mut incoming: futures::stream::SplitStream<WebSocket>,
    mut stdin: Option<std::pin::Pin<Box<dyn AsyncWrite + Send>>>,
    resize: Option<mpsc::Sender<(u16, u16)>>,
    v5: bool,
) {
    while let Some(Ok(msg)) = incoming.next().await {
        let Message::Binary(bytes) = msg else {
            if matches!(msg, Message::Close(_)) {
                return;
            }
            continue;
        };
        match channel::decode(&bytes, v5) {
            Some(Frame::Data { channel: channel::STDIN, data }) => {
                if let Some(w) = stdin.as_mut()
                    && w.write_all(data).await.is_err()
                {
                    stdin = None;
                }
            }
            Some(Frame::Data { channel: channel::RESIZE, data }) => {
                if let (Some(tx), Some(size)) = (&resize, channel::decode_resize(data)) {
                    let _ = tx.send(size).await;
                }
            }
            Some(Frame::Close { channel: channel::STDIN }) => {
                if let Some(mut w) = stdin.take() {
                    let _ = w.shutdown().await;
                }
            }
            _ => {}
        }
    }
}

async fn run(socket: WebSocket, session: ExecSession, command: Vec<String>) {
    let v5 = socket.protocol().is_some_and(|p| p == channel::V5);
    let (mut sink, incoming) = socket.split();
    let ExecSession { stdin, stdout, stderr, resize, exit } = session;
    let (tx, mut rx) = mpsc::channel::<Message>(32);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let input = tokio::spawn(input(incoming, stdin, resize, v5));
    tokio::join!(copy_out(stdout, channel::STDOUT, tx.clone()), copy_out(stderr, channel::STDERR, tx.clone()));
    // A node that drops the exit sender lost the process: report it as failed.
    let code = exit.await.unwrap_or(-1);
    let status = serde_json::to_vec(&exit_status(code, &command)).unwrap_or_default();
    let _ = tx.send(Message::Binary(channel::encode(channel::ERROR, &status).into())).await;
    let _ = tx.send(channel::normal_close()).await;
    drop(tx);
    let _ = writer.await;
    input.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_become_statuses() {
        assert_eq!(exit_status(0, &[])["status"], "Success");
        let s = exit_status(3, &["sh".into(), "-c".into(), "exit 3".into()]);
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(s["reason"], "NonZeroExitCode");
    }
}
