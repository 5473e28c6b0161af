//! The agent's transports on `AGENT_TRANSPORT_PORT`: TCP streams (hello, then
//! WireGuard frames; what a port-forward carries) and plain UDP datagrams.
//! The session locks to the first sidecar's key; every new stream from it
//! becomes the route for replies, so a redialled stream takes over without
//! ending the session.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tpd_wire::hello::{Hello, Role};
use tpd_wire::io as wio;
use tpd_wire::tunnel::{Endpoint, Route};
use tpd_wire::udp::TunnelUdp;

/// Queue of datagrams waiting for one stream's writer.
const STREAM_QUEUE: usize = 4096;

pub async fn serve_streams(listener: TcpListener, wg: Arc<Endpoint>) {
    loop {
        match listener.accept().await {
            Ok((sock, addr)) => {
                let wg = wg.clone();
                tokio::spawn(async move {
                    match serve_stream(sock, &wg).await {
                        Ok(()) => tracing::info!(%addr, "transport stream closed"),
                        Err(e) => tracing::warn!(%addr, "transport stream closed: {e:#}"),
                    }
                });
            }
            Err(e) => tracing::warn!("accepting a transport stream: {e}"),
        }
    }
}

async fn serve_stream(sock: TcpStream, wg: &Endpoint) -> anyhow::Result<()> {
    sock.set_nodelay(true)?;
    let (mut rd, mut wr) = sock.into_split();
    wr.write_all(&Hello { role: Role::Agent, public_key: wg.public_key() }.encode()).await?;
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let hello = wio::read_hello(&mut rd, &mut buf).await?;
    anyhow::ensure!(hello.role == Role::Sidecar, "the peer introduced itself as {:?}, not a sidecar", hello.role);
    anyhow::ensure!(
        wg.lock_peer(hello.public_key),
        "refusing a second peer: this agent's session is locked to the first sidecar that connected"
    );
    tracing::info!("transport stream up");

    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let writer = tokio::spawn(wio::write_frames(wr, rx));
    let route = Route::Stream(tx);
    wg.set_route(route.clone());
    let read = wio::read_frames(&mut rd, buf, |d| {
        crate::stack::set_transport_lossy(false);
        wg.receive(None, d, &route);
    })
    .await;
    writer.abort();
    Ok(read?)
}

pub async fn serve_udp(udp: Arc<TunnelUdp>, wg: Arc<Endpoint>) {
    let sender = udp.sender();
    udp.read_each(|datagram, from| {
        crate::stack::set_transport_lossy(true);
        wg.receive(Some(from.ip()), datagram, &Route::Udp(sender.clone(), from));
    })
    .await;
}
