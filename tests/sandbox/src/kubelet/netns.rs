//! Connections that start inside a pod's network namespace, as a kubelet's
//! port-forward does: containerd and CRI-O enter the pod sandbox's netns and
//! dial `localhost:PORT`, so what a port-forward reaches arrives on the
//! pod's loopback, not on its IP. tpd's agent admits a session only over
//! such a connection, so the sandbox must land there too.
//!
//! `setns` changes the namespace of the calling thread only, so the socket
//! is opened on a thread of its own that ends right after; the socket keeps
//! the namespace it was created in. Needs CAP_SYS_ADMIN (the sandbox runs
//! as root).

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use nix::sched::CloneFlags;
use tokio::net::TcpStream;

/// How long a connect on the pod's loopback may take (a closed port is refused at once).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `127.0.0.1:port` in the network namespace of process `pid`.
pub async fn connect_loopback(pid: i64, port: u16) -> io::Result<TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("netns-connect".into()).spawn(move || {
        // The receiver waits for this send; nothing to do if it is gone.
        let _ = tx.send(connect_in(pid, port));
    })?;
    let stream = rx.await.map_err(|_| io::Error::other("the thread entering the pod's netns ended early"))??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

fn connect_in(pid: i64, port: u16) -> io::Result<std::net::TcpStream> {
    let netns = File::open(format!("/proc/{pid}/ns/net"))?;
    nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
    std::net::TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), CONNECT_TIMEOUT)
}
