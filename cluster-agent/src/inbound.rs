//! Inbound traffic: connections to the developer's app. The userspace stack
//! only accepts, so the agent cannot dial into the tunnel: [`Inbound::dial`]
//! tells the sidecar (`Inbound {id, port}` on the control connection), the
//! sidecar connects to the local app and dials the agent's inbound port
//! inside the tunnel with a header naming `id`, and that connection is the
//! dial's result. A swap listens on the swapped container's ports as
//! ordinary sockets and splices each cluster client to such a connection;
//! an intercept's router sends requests over them.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tpd_tunnel::io as wio;
use tpd_wire::control::Message;

use crate::control::Control;
use crate::services::BoxConn;

/// How long a dial waits for the sidecar to dial back.
const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What a pending dial is answered with: the sidecar's connection, or why not.
type Answer = io::Result<BoxConn>;

pub struct Inbound {
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
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

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Answer>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection to the developer's app on `port` (the container port it
    /// stands for), through the sidecar.
    pub async fn dial(&self, port: u16) -> io::Result<BoxConn> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id, tx);
        if !self.control.notify(Message::Inbound { id, port }) {
            self.pending().remove(&id);
            return Err(io::Error::new(io::ErrorKind::NotConnected, "no sidecar is connected"));
        }
        let answer = tokio::time::timeout(DIAL_BACK_TIMEOUT, rx).await;
        // Gone already unless the wait timed out.
        self.pending().remove(&id);
        match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(io::Error::other("the agent's session ended")),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the sidecar did not answer")),
        }
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
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let this = self.clone();
            tokio::spawn(async move {
                match this.dial(port).await {
                    Ok(mut app) => drop(tokio::io::copy_bidirectional(&mut client, &mut app).await),
                    Err(e) => {
                        tracing::warn!(port, "inbound connection reset: {e}");
                        reset(client);
                    }
                }
            });
        }
    }

    /// Handler of the inbound relay port: answers the dial the sidecar's connection names.
    pub async fn relay(&self, mut conn: BoxConn) {
        let header = match wio::read_inbound_header(&mut conn).await {
            Ok(h) => h,
            Err(e) => return tracing::warn!("inbound relay connection closed: {e}"),
        };
        let Some(waiting) = self.pending().remove(&header.id) else {
            return tracing::debug!(id = header.id, "inbound relay for an unknown or expired connection");
        };
        let answer = match header.accepted {
            true => Ok(conn),
            false => Err(io::Error::new(io::ErrorKind::ConnectionRefused, "nothing listens on the mapped local port")),
        };
        // A dial that gave up meanwhile drops the connection, closing it.
        let _ = waiting.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;
    use tpd_wire::inbound::Header;

    /// An Inbound whose control connection is the returned queue.
    fn inbound() -> (Arc<Inbound>, mpsc::Receiver<Message>) {
        let control = Arc::new(Control::new(Arc::default()));
        let (tx, rx) = mpsc::channel(8);
        control.connect_for_test(tx);
        (Arc::new(Inbound::new(control)), rx)
    }

    /// The sidecar's side: dial back for `id` with `accepted`, over an in-memory pipe.
    fn dial_back(inbound: &Arc<Inbound>, id: u64, accepted: bool) {
        let (mut sidecar, agent) = tokio::io::duplex(1024);
        let inbound = inbound.clone();
        tokio::spawn(async move { inbound.relay(Box::new(agent)).await });
        let head = Header { id, accepted }.encode();
        tokio::spawn(async move {
            sidecar.write_all(&head).await.unwrap();
            sidecar.write_all(b"from the app").await.unwrap();
            let mut buf = BytesMut::new();
            let _ = sidecar.read_buf(&mut buf).await;
        });
    }

    #[tokio::test]
    async fn a_dial_gets_the_connection_the_sidecar_dials_back() {
        let (inbound, mut control) = inbound();
        let dial = tokio::spawn({
            let inbound = inbound.clone();
            async move { inbound.dial(8080).await }
        });
        let Some(Message::Inbound { id, port: 8080 }) = control.recv().await else { panic!("no Inbound notice") };
        dial_back(&inbound, id, true);
        let mut conn = dial.await.unwrap().unwrap();
        let mut got = [0u8; 12];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"from the app");
    }

    #[tokio::test]
    async fn a_dial_fails_when_the_app_refused_or_no_sidecar_is_there() {
        let (inbound, mut control) = inbound();
        let dial = tokio::spawn({
            let inbound = inbound.clone();
            async move { inbound.dial(8080).await }
        });
        let Some(Message::Inbound { id, .. }) = control.recv().await else { panic!("no Inbound notice") };
        dial_back(&inbound, id, false);
        let err = dial.await.unwrap().err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

        let alone = Inbound::new(Arc::new(Control::new(Arc::default())));
        assert_eq!(alone.dial(8080).await.err().unwrap().kind(), io::ErrorKind::NotConnected);
    }
}
