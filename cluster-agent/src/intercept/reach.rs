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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::test_shared;
    use crate::intercept::port;
    use crate::intercept::registry::{RegisterStream, Registry};
    use crate::intercept::testing;
    use tokio::net::TcpListener;
    use tpd_tunnel::io as wio;
    use tpd_wire::control::Message;
    use tpd_wire::inbound::Header;

    const WAIT: Duration = Duration::from_secs(10);

    /// The sidecar of session `s` on an instance of `instances`, over
    /// in-memory pipes where the tunnel would be: it says hello with its
    /// session and answers every `Inbound` by dialling `app`.
    async fn sidecar(instances: &Arc<Instances>, app: u16) -> crate::instance::Admitted {
        let admitted = instances.admit([7; 32]).unwrap();
        let instance = admitted.instance.clone();
        let (agent_end, mut end) = tokio::io::duplex(64 * 1024);
        let control = instance.control.clone();
        tokio::spawn(async move { control.serve(Box::new(agent_end)).await });
        tokio::spawn(async move {
            let mut out = BytesMut::from(&preamble::encode(Kind::Control)[..]);
            let hello = Message::Hello { version: "test".into(), udp_receive_buffer: None, session: Some("s".into()) };
            control::encode(&hello, &mut out).unwrap();
            end.write_all(&out).await.unwrap();
            let mut buf = BytesMut::new();
            wio::read_preamble(&mut end, &mut buf, Kind::Control).await.unwrap();
            while let Ok(Some(msg)) = wio::read_message::<_, Message>(&mut end, &mut buf).await {
                let Message::Inbound { id, port: 8080 } = msg else { continue };
                let (agent_end, mut conn) = tokio::io::duplex(64 * 1024);
                let inbound = instance.inbound.clone();
                tokio::spawn(async move { inbound.relay(Box::new(agent_end)).await });
                conn.write_all(&Header { id, accepted: true }.encode()).await.unwrap();
                let mut app = TcpStream::connect(("127.0.0.1", app)).await.unwrap();
                tokio::spawn(async move { tokio::io::copy_bidirectional(&mut conn, &mut app).await });
            }
        });
        // Bounded: the hello has arrived once the instance knows its session.
        for _ in 0..200 {
            if instances.by_session("s").is_some() {
                return admitted;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the sidecar's hello never arrived");
    }

    async fn echoes(mut conn: BoxConn) {
        conn.write_all(b"hello app").await.unwrap();
        let mut got = [0u8; 9];
        tokio::time::timeout(WAIT, conn.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got, b"hello app");
    }

    /// The home agent reaches the app through the session's tunnel; another
    /// agent of the workload relays to it with the token, and not without.
    #[tokio::test]
    async fn a_session_is_reached_on_its_home_agent_and_relayed_from_another() {
        let app = testing::echo_server().await;
        let home = Instances::per_key(test_shared());
        let _sidecar = sidecar(&home, app).await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(Registry::new([8080], Duration::from_secs(15)));
        let register = testing::register("s", "secret", addr, vec![testing::every_request(8080)]);
        assert!(RegisterStream::default().handle(&registry, register).is_ok());
        tokio::spawn(port::serve(listener, registry, home.clone()));

        let target = Target { session: "s".into(), token: "secret".into(), holder: "s@laptop".into(), home: addr };
        echoes(Sessions(home).connect(&target, 8080).await.unwrap()).await;
        let elsewhere = Sessions(Instances::per_key(test_shared()));
        echoes(elsewhere.connect(&target, 8080).await.unwrap()).await;
        let forged = Target { token: "guess".into(), ..target };
        let err = elsewhere.connect(&forged, 8080).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}
