//! The sidecar's control connection to the agent, inside the tunnel: it
//! fetches the agent's version and environment, announces readiness once
//! (status file + one JSON line on stdout), pings for health, opens the
//! dial-back connection for every inbound client the agent reports and
//! keeps the pod's neighbour ports it reports listening on 127.0.0.1.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tpd_tunnel::io as wio;
use tpd_wire::control::Message;
use tpd_wire::inbound::Header;
use tpd_wire::names::{self, AGENT_CONTROL_PORT, AGENT_INBOUND_PORT, AGENT_TUNNEL_IP};
use tpd_wire::preamble::{self, Kind};
use tpd_wire::sidecar::{Event, Status};

const PING_EVERY: Duration = Duration::from_secs(15);
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Control {
    pub session_dir: PathBuf,
    pub ports: HashMap<u16, u16>,
    /// Set when the volumes are to be mounted before ready: they unmount
    /// when the token fires, and their requests wait this long for a lost
    /// agent to come back.
    pub volumes: Option<(tokio_util::sync::CancellationToken, tpd_wire::sidecar::Volumes)>,
    /// The transport's news: the carrier, a replaced agent.
    pub link: crate::transport::Link,
    /// The mounted volumes, held for the session's life.
    pub mounted: std::sync::Mutex<Option<tpd_volumes::fuse::MountHandle>>,
    /// The pod's neighbour ports on 127.0.0.1, which the agent's `PodPorts` update.
    pub neighbours: Arc<crate::neighbours::Neighbours>,
    /// The session id, told to the agent in the hello.
    pub session: Option<String>,
}

impl Control {
    /// Keeps a control connection up for the session's life.
    /// A new agent (its pod replaced) ends the connection at once: the old
    /// one's TCP state is gone, and the new agent announces inbound clients
    /// only on a connection of its own.
    pub async fn run(self: Arc<Self>) {
        let mut announced = false;
        loop {
            tokio::select! {
                r = self.connection(&mut announced) => {
                    if let Err(e) = r {
                        tracing::warn!("control connection to the agent: {e:#}; reconnecting");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                () = self.link.agent_replaced() => {
                    tracing::info!("the agent was replaced; reconnecting the control connection");
                }
            }
        }
    }

    async fn connection(self: &Arc<Self>, announced: &mut bool) -> anyhow::Result<()> {
        let sock = connect_through_the_tunnel(
            SocketAddr::from((AGENT_TUNNEL_IP, AGENT_CONTROL_PORT)),
            Duration::from_secs(10),
        )
        .await?;
        let (mut rd, mut wr) = sock.into_split();
        let mut buf = BytesMut::new();
        wr.write_all(&preamble::encode(Kind::Control)).await?;
        wio::read_preamble(&mut rd, &mut buf, Kind::Control).await?;
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(wio::write_messages(wr, rx));
        let udp_receive_buffer = self.link.udp_receive_buffer().map(|b| b as u64);
        let session = self.session.clone();
        tx.send(Message::Hello { version: tpd_wire::VERSION.into(), udp_receive_buffer, session }).await?;
        let pinger = tokio::spawn(ping(tx));
        let result = self.read_loop(&mut rd, &mut buf, announced).await;
        pinger.abort();
        writer.abort();
        result
    }

    async fn read_loop(
        self: &Arc<Self>,
        rd: &mut tokio::net::tcp::OwnedReadHalf,
        buf: &mut BytesMut,
        announced: &mut bool,
    ) -> anyhow::Result<()> {
        while let Some(msg) = wio::read_message(rd, buf).await? {
            match msg {
                Message::Info { version, env } if !*announced => {
                    if let Some((shutdown, volumes)) = &self.volumes {
                        let cfg = tpd_volumes::fuse::MountConfig {
                            retry_for: volumes.retry_for,
                            cache: volumes.cache,
                            agents: Some(self.link.agents()),
                            ..tpd_volumes::fuse::MountConfig::in_tunnel()
                        };
                        let mounts = tpd_volumes::fuse::mount_all(cfg, shutdown.clone()).await?;
                        tracing::info!(count = mounts.paths().len(), "volumes mounted");
                        *self.mounted.lock().unwrap_or_else(|p| p.into_inner()) = Some(mounts);
                    }
                    self.announce_ready(&version, &env)?;
                    *announced = true;
                }
                Message::Inbound { id, port } => {
                    let this = self.clone();
                    tokio::spawn(async move { this.inbound(id, port).await });
                }
                // The agent sends it before `Info`, so these listen before ready.
                Message::PodPorts { ports } => self.neighbours.apply(&ports),
                _ => {}
            }
        }
        anyhow::bail!("the agent closed the control connection")
    }

    fn announce_ready(&self, agent_version: &str, env: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let status = Status {
            protocol_version: names::PROTOCOL_VERSION,
            sidecar_version: tpd_wire::VERSION.into(),
            agent_version: agent_version.into(),
            tunnel_ip: names::SIDECAR_TUNNEL_IP,
            agent_tunnel_ip: AGENT_TUNNEL_IP,
            transport: self.link.chosen(),
            env: env.clone(),
        };
        let status_file = write_status(&self.session_dir, &status)?;
        let line = Event::Ready {
            protocol_version: names::PROTOCOL_VERSION,
            agent_version: agent_version.into(),
            status_file,
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
        out.flush()?;
        tracing::info!(agent_version, "tunnel up, DNS serving: ready");
        Ok(())
    }

    /// Connects the local app, then dials back to the agent naming the client.
    async fn inbound(&self, id: u64, port: u16) {
        // Unmapped ports keep their number.
        let local_port = self.ports.get(&port).copied().unwrap_or(port);
        let local = tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", local_port))).await;
        let mut local = match local {
            Ok(Ok(s)) => Some(s),
            _ => {
                tracing::warn!(
                    port,
                    local_port,
                    "inbound connection refused: nothing listens on 127.0.0.1:{local_port}"
                );
                None
            }
        };
        let back = async {
            let mut s = TcpStream::connect((AGENT_TUNNEL_IP, AGENT_INBOUND_PORT)).await?;
            s.set_nodelay(true)?;
            s.write_all(&Header { id, accepted: local.is_some() }.encode()).await?;
            if let Some(local) = local.as_mut() {
                let _ = local.set_nodelay(true);
                tokio::io::copy_bidirectional(local, &mut s).await?;
            }
            std::io::Result::Ok(())
        };
        if let Err(e) = back.await {
            tracing::debug!(port, "inbound connection ended: {e}");
        }
    }
}

async fn ping(tx: mpsc::Sender<Message>) {
    let mut seq = 0;
    loop {
        tokio::time::sleep(PING_EVERY).await;
        seq += 1;
        if tx.send(Message::Ping { seq }).await.is_err() {
            return;
        }
    }
}

/// Connects to the agent inside the tunnel. The first SYN usually leaves
/// before the WireGuard session exists and is lost; TCP would resend it only
/// after 1 s, so a fresh attempt goes after 250 ms, then after twice as long
/// each time (up to 2 s, for long round trips).
async fn connect_through_the_tunnel(to: SocketAddr, limit: Duration) -> anyhow::Result<TcpStream> {
    let started = std::time::Instant::now();
    let mut attempt = Duration::from_millis(250);
    loop {
        match tokio::time::timeout(attempt, TcpStream::connect(to)).await {
            Ok(sock) => return Ok(sock?),
            Err(_) if started.elapsed() < limit => attempt = (attempt * 2).min(Duration::from_secs(2)),
            Err(_) => anyhow::bail!("the tunnel did not come up within {} s", limit.as_secs()),
        }
    }
}

/// Writes `status.json` atomically with mode 0600; returns its path.
pub fn write_status(dir: &Path, status: &Status) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the session directory {}", dir.display()))?;
    let path = dir.join(names::STATUS_FILE);
    let tmp = dir.join(format!(".{}.tmp", names::STATUS_FILE));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    serde_json::to_writer(&mut f, status)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tpd_wire::sidecar::Carrier;

    #[test]
    fn status_file_is_private_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([("DB_PASSWORD".to_string(), "s3cret".to_string())]);
        let status = Status {
            protocol_version: names::PROTOCOL_VERSION,
            sidecar_version: tpd_wire::VERSION.into(),
            agent_version: "0.1.0".into(),
            tunnel_ip: names::SIDECAR_TUNNEL_IP,
            agent_tunnel_ip: AGENT_TUNNEL_IP,
            transport: Some(Carrier::Udp),
            env,
        };
        let path = write_status(dir.path(), &status).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let back: Status = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back, status);
    }
}
