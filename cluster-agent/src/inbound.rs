//! Inbound traffic: the agent listens on the swapped container's ports as
//! ordinary sockets. For each cluster client it tells the sidecar
//! (`Inbound {id, port}` on the control connection); the sidecar connects to
//! the local app and dials the agent's inbound port inside the tunnel with a
//! header naming `id`, and the two connections are spliced. The userspace
//! stack only accepts, so the sidecar dials back rather than the agent dialling in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tpd_tunnel::io as wio;
use tpd_wire::control::Message;

use crate::control::Control;
use crate::services::BoxConn;

/// How long a client waits for the sidecar to dial back before it is reset.
const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    pending: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    control: Arc<Control>,
}

fn reset(client: TcpStream) {
    // Linger 0: close with RST, so the client sees "connection reset" at once.
    let _ = client.set_zero_linger();
}

impl Inbound {
    pub fn new(control: Arc<Control>) -> Self {
        Inbound { pending: Mutex::default(), next_id: AtomicU64::new(1), control }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds every port first (so a taken port fails the agent's start), then serves them.
    pub async fn listen(self: Arc<Self>, ports: &[u16]) -> anyhow::Result<()> {
        for &port in ports {
            let listener = TcpListener::bind(("0.0.0.0", port))
                .await
                .map_err(|e| anyhow::anyhow!("listening on inbound port {port}: {e}"))?;
            tokio::spawn(self.clone().accept_loop(listener, port));
        }
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, port: u16) {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.pending().insert(id, client);
            if !self.control.notify(Message::Inbound { id, port }) {
                tracing::warn!(port, "inbound connection refused: no sidecar is connected");
                if let Some(c) = self.pending().remove(&id) {
                    reset(c);
                }
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(DIAL_BACK_TIMEOUT).await;
                if let Some(c) = this.pending().remove(&id) {
                    tracing::warn!(port, "inbound connection reset: the sidecar did not answer");
                    reset(c);
                }
            });
        }
    }

    /// Handler of the inbound relay port: pairs the sidecar's connection with the client.
    pub async fn relay(&self, mut conn: BoxConn) {
        let header = match wio::read_inbound_header(&mut conn).await {
            Ok(h) => h,
            Err(e) => return tracing::warn!("inbound relay connection closed: {e}"),
        };
        let Some(mut client) = self.pending().remove(&header.id) else {
            return tracing::debug!(id = header.id, "inbound relay for an unknown or expired connection");
        };
        if !header.accepted {
            tracing::info!(id = header.id, "inbound connection reset: nothing listens on the mapped local port");
            return reset(client);
        }
        let _ = tokio::io::copy_bidirectional(&mut client, &mut conn).await;
    }
}
