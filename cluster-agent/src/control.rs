//! The control service: answers the sidecar's hello with the agent's version
//! and environment (for env injection), pings with pongs, and carries the
//! agent's `Inbound` notices and the pod's neighbour ports (`PodPorts`) to
//! the sidecar over the newest control connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tpd_tunnel::io as wio;
use tpd_wire::control::Message;
use tpd_wire::names::agent_env;
use tpd_wire::neighbours::PodPort;
use tpd_wire::preamble::{self, Kind};

use crate::services::BoxConn;
use crate::window::SendWindow;

pub struct Control {
    /// Sender of the newest control connection, for `Inbound` notices.
    notify: Mutex<Option<mpsc::Sender<Message>>>,
    /// Fitted to the UDP receive buffer the sidecar's hello reports.
    window: Arc<SendWindow>,
    /// The neighbour ports last found, sent to each sidecar before `Info`.
    pod_ports: Mutex<Vec<PodPort>>,
    /// The session id the sidecar's hello named: an intercept agent
    /// delivers that session's requests over this instance's tunnel.
    session: Mutex<Option<String>>,
}

/// The environment to inject: the agent's own minus tpd's variables.
pub fn injectable_env() -> BTreeMap<String, String> {
    std::env::vars().filter(|(k, _)| !agent_env::ALL.contains(&k.as_str())).collect()
}

impl Control {
    pub fn new(window: Arc<SendWindow>) -> Self {
        Control { notify: Mutex::default(), window, pod_ports: Mutex::default(), session: Mutex::default() }
    }

    /// The session id of the sidecar's last hello, if it named one.
    pub fn session(&self) -> Option<String> {
        self.session.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends `msg` to the sidecar; false when no control connection is up.
    pub fn notify(&self, msg: Message) -> bool {
        let tx = self.notify.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tx.is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// Whether a sidecar's control connection is up.
    pub fn connected(&self) -> bool {
        self.notify.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// Makes `tx` the control connection, as `serve` does for a sidecar's.
    #[cfg(test)]
    pub fn connect_for_test(&self, tx: mpsc::Sender<Message>) {
        *self.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Records the pod's neighbour ports and tells the connected sidecar.
    pub fn set_pod_ports(&self, ports: Vec<PodPort>) {
        *self.pod_ports.lock().unwrap_or_else(|p| p.into_inner()) = ports.clone();
        self.notify(Message::PodPorts { ports });
    }

    fn pod_ports(&self) -> Message {
        Message::PodPorts { ports: self.pod_ports.lock().unwrap_or_else(|p| p.into_inner()).clone() }
    }

    pub async fn serve(&self, conn: BoxConn) {
        if let Err(e) = self.serve_inner(conn).await {
            tracing::warn!("control connection closed: {e}");
        }
    }

    async fn serve_inner(&self, conn: BoxConn) -> std::io::Result<()> {
        let (mut rd, mut wr) = tokio::io::split(conn);
        let mut buf = BytesMut::new();
        wr.write_all(&preamble::encode(Kind::Control)).await?;
        wio::read_preamble(&mut rd, &mut buf, Kind::Control).await?;
        let (tx, rx) = mpsc::channel(256);
        let writer = tokio::spawn(wio::write_messages(wr, rx));
        *self.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
        while let Some(msg) = wio::read_message(&mut rd, &mut buf).await? {
            let reply = match msg {
                Message::Hello { version, udp_receive_buffer, session } => {
                    let udp_window =
                        udp_receive_buffer.map(|b| self.window.fit_udp(usize::try_from(b).unwrap_or(usize::MAX)));
                    tracing::info!(sidecar_version = %version, ?udp_receive_buffer, ?udp_window, ?session, "sidecar connected to control");
                    if session.is_some() {
                        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = session;
                    }
                    // Before `Info`: the sidecar listens on these before it
                    // reports ready and the developer's container starts.
                    if tx.send(self.pod_ports()).await.is_err() {
                        break;
                    }
                    Message::Info { version: tpd_wire::VERSION.into(), env: injectable_env() }
                }
                Message::Ping { seq } => Message::Pong { seq },
                _ => {
                    // Not logged in full: a message may hold env values.
                    tracing::debug!("ignoring an unexpected control message");
                    continue;
                }
            };
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        writer.abort();
        Ok(())
    }
}
