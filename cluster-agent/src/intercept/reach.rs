//! Reaching a session's developer app: through its tunnel when this agent
//! holds it, else through the agent that does (its registration's `home`),
//! with a relay stream.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tpd_wire::control;
use tpd_wire::intercept::{Kind, RelayHeader};
use tpd_wire::preamble;

use super::port::RELAY_ACCEPTED;
use super::registry::Target;
use crate::instance::Instances;
use crate::services::BoxConn;

/// Bound on connecting to the home agent, and on its answer (which waits
/// for the sidecar's dial-back, itself bounded at 10 s).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// Opens connections to a session's developer app on one of its ports.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, target: &Target, port: u16) -> impl Future<Output = io::Result<BoxConn>> + Send;
}

/// The agent's connector: its own instances, or a relay to the home agent.
pub struct Sessions(pub Arc<Instances>);

impl Connector for Sessions {
    async fn connect(&self, target: &Target, port: u16) -> io::Result<BoxConn> {
        match self.0.by_session(&target.session) {
            Some(instance) => instance.inbound.dial(port).await,
            None => relay(target, port).await,
        }
    }
}

/// A connection to `port` of the session's app through its home agent.
async fn relay(target: &Target, port: u16) -> io::Result<BoxConn> {
    let timed_out = |_| io::Error::from(io::ErrorKind::TimedOut);
    let mut sock =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.home)).await.map_err(timed_out)??;
    sock.set_nodelay(true)?;
    let mut head = BytesMut::from(&preamble::encode(Kind::Relay)[..]);
    let header = RelayHeader { session: target.session.clone(), token: target.token.clone(), port };
    control::encode(&header, &mut head).map_err(io::Error::other)?;
    sock.write_all(&head).await?;
    let mut answer = [0u8];
    tokio::time::timeout(ANSWER_TIMEOUT, sock.read_exact(&mut answer)).await.map_err(timed_out)??;
    match answer[0] {
        RELAY_ACCEPTED => Ok(Box::new(sock)),
        _ => Err(io::Error::new(io::ErrorKind::ConnectionRefused, "the session's home agent could not reach it")),
    }
}
