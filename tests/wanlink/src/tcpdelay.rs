//! [`TcpDelay`]: a TCP relay that puts a round-trip time in front of one
//! server, for what the TUN link cannot reach without moving the server
//! into a namespace (the sandbox's API server, which `bench session` puts
//! 20-80 ms from tpd). No root needed.
//!
//! Every chunk read from one side is written to the other `rtt / 2` after
//! it was read, in the order read (one queue per direction, drained by its
//! own thread), so a request and its answer cost one RTT. The relay
//! accepts at once, but a real TCP client can send nothing before the
//! handshake's round trip: bytes from the client are therefore not sent
//! before one RTT after the connection was accepted, as if they had waited
//! for the SYN-ACK. TLS would add its own round trips; the sandbox's API is
//! plain HTTP, so there is none here.
//!
//! The relay also notes the request line of every HTTP/1.1 request the
//! clients send ([`TcpDelay::requests`]): what a session asks the API, in
//! order, with the time it was sent.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest chunk read at once.
const CHUNK: usize = 64 * 1024;
const METHODS: [&str; 6] = ["GET ", "POST ", "PUT ", "PATCH ", "DELETE ", "HEAD "];

/// One HTTP request a client sent through the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// When the relay read it (before the delay).
    pub at: Instant,
    /// The connection it came on, numbered from 0 in accept order.
    pub connection: usize,
    /// `METHOD PATH`, without the HTTP version.
    pub line: String,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    requests: Mutex<Vec<Request>>,
    /// Every relayed stream, shut down when the relay is dropped (kept
    /// until then: a bench's relay sees a few dozen connections).
    streams: Mutex<Vec<TcpStream>>,
}

/// A listening relay on loopback to `upstream`; dropping it closes every
/// connection it relays.
pub struct TcpDelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpDelay").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl TcpDelay {
    /// Listens on an ephemeral loopback port and relays every connection to
    /// `upstream`, each direction `rtt / 2` late.
    pub fn start(upstream: SocketAddr, rtt: Duration) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tcpdelay-accept".into())
                .spawn(move || accept_loop(&listener, upstream, rtt, &shared))?
        };
        Ok(Self { addr, shared, accept: Some(accept) })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The HTTP requests relayed so far, in the order they were read.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for TcpDelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(self.addr);
        for s in self.shared.streams.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, rtt: Duration, shared: &Arc<Shared>) {
    let mut connection = 0;
    loop {
        let accepted = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((client, _)) => {
                let accepted = Instant::now();
                // A client whose upstream cannot be reached sees its connection closed.
                if let Err(e) = relay(client, upstream, rtt, accepted, connection, shared) {
                    eprintln!("tcpdelay: connection {connection}: {e}");
                }
                connection += 1;
            }
            Err(e) => {
                eprintln!("tcpdelay: accept: {e}");
                // Out of file descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Starts the four threads of one connection: a reader and a writer each way.
fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    rtt: Duration,
    accepted: Instant,
    connection: usize,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        shared.streams.lock().unwrap_or_else(|p| p.into_inner()).push(s.try_clone()?);
    }
    let half = rtt / 2;
    // The client's first bytes leave after the handshake's round trip.
    let up = Direction { not_before: accepted + rtt + half, delay: half, requests: Some((connection, shared.clone())) };
    let down = Direction { not_before: accepted, delay: half, requests: None };
    up.spawn(client.try_clone()?, server.try_clone()?)?;
    down.spawn(server, client)?;
    Ok(())
}

/// One direction of a connection.
struct Direction {
    /// No byte is written before this.
    not_before: Instant,
    delay: Duration,
    /// Where to note HTTP request lines (the client's direction only).
    requests: Option<(usize, Arc<Shared>)>,
}

impl Direction {
    fn spawn(self, from: TcpStream, to: TcpStream) -> io::Result<()> {
        let (tx, rx) = channel();
        let not_before = self.not_before;
        std::thread::Builder::new().name("tcpdelay-write".into()).spawn(move || write_loop(&rx, to, not_before))?;
        std::thread::Builder::new().name("tcpdelay-read".into()).spawn(move || self.read_loop(from, &tx))?;
        Ok(())
    }

    /// Reads chunks and queues each with the time it is due; `None` at the end.
    fn read_loop(self, mut from: TcpStream, tx: &Sender<Option<(Instant, Vec<u8>)>>) {
        let mut buf = vec![0; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let now = Instant::now();
            if let Some((connection, shared)) = &self.requests {
                note_requests(&buf[..n], now, *connection, shared);
            }
            if tx.send(Some((now + self.delay, buf[..n].to_vec()))).is_err() {
                break;
            }
        }
        let _ = tx.send(None);
    }
}

/// Writes each chunk when it is due; at the end, closes the write half.
fn write_loop(rx: &Receiver<Option<(Instant, Vec<u8>)>>, mut to: TcpStream, not_before: Instant) {
    while let Ok(Some((due, chunk))) = rx.recv() {
        let due = due.max(not_before);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&chunk).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Notes the request lines that start in `chunk`: a chunk that begins with
/// an HTTP method (hyper writes each request's head in one write; bodies,
/// port-forward and watch streams do not begin with one).
fn note_requests(chunk: &[u8], at: Instant, connection: usize, shared: &Shared) {
    let Some(line) = chunk.split(|&b| b == b'\n').next() else { return };
    let line = String::from_utf8_lossy(line);
    let Some(request) = line.trim_end().strip_suffix(" HTTP/1.1") else { return };
    if METHODS.iter().any(|m| request.starts_with(m)) {
        let request = Request { at, connection, line: request.to_owned() };
        shared.requests.lock().unwrap_or_else(|p| p.into_inner()).push(request);
    }
}
