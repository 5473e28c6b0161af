//! UDP round trips over the link, as `ping` measures them but pipelined:
//! requests leave at a fixed interval whatever the answers do, so a lost
//! packet costs no waiting and thousands of round trips take seconds. Each
//! request carries its sequence number; the echo sends it back. The three
//! threads (sender, echo, receiver) have the relay's real-time priority.

use std::collections::HashSet;
use std::io;
use std::net::UdpSocket;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::relay;

/// Bytes of each request and answer (UDP payload).
const SIZE: usize = 64;
/// How often the echo and the receiver look up from a quiet socket to see
/// whether they should stop.
const POLL: Duration = Duration::from_millis(20);

/// The round trips of one run.
#[derive(Debug, Clone)]
pub struct Echo {
    pub sent: u32,
    /// The round trip of every answered request, shortest first.
    pub rtts: Vec<Duration>,
}

impl Echo {
    pub fn received(&self) -> u32 {
        self.rtts.len() as u32
    }

    /// The fraction of requests left unanswered.
    pub fn loss(&self) -> f64 {
        if self.sent == 0 { 0.0 } else { 1.0 - f64::from(self.received()) / f64::from(self.sent) }
    }

    /// The `p` quantile (0.5 for the median) of the answered round trips.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let last = self.rtts.len().checked_sub(1)?;
        self.rtts.get(((last as f64) * p).round() as usize).copied()
    }
}

/// Echoes on `server`, asks from `client`; waits for the last answers up
/// to twice `rtt` and a second.
pub fn run(server: UdpSocket, client: UdpSocket, count: u32, interval: Duration, rtt: Duration) -> io::Result<Echo> {
    client.connect(server.local_addr()?)?;
    server.set_read_timeout(Some(POLL))?;
    client.set_read_timeout(Some(POLL))?;
    let done = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU32::new(0));
    std::thread::scope(|scope| {
        let echo = scope.spawn(|| realtime(|| serve(&server, &done)));
        let receiver = {
            let (client, done, answered) = (&client, &done, &answered);
            scope.spawn(move || realtime(|| receive(client, done, answered)))
        };
        let sent = scope.spawn(|| realtime(|| send(&client, count, interval))).join();
        let sent = sent.map_err(|_| io::Error::other("the echo sender panicked")).and_then(|sent| sent);
        if sent.is_ok() {
            let deadline = Instant::now() + rtt * 2 + Duration::from_secs(1);
            while answered.load(Ordering::Relaxed) < count && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        done.store(true, Ordering::Relaxed);
        let received = receiver.join().map_err(|_| io::Error::other("the echo receiver panicked"))??;
        echo.join().map_err(|_| io::Error::other("the echo server panicked"))??;
        let sent = sent?;
        let mut seen = HashSet::new();
        let mut rtts: Vec<Duration> = received
            .into_iter()
            .filter(|(seq, _)| seen.insert(*seq))
            .filter_map(|(seq, at)| Some(at - *sent.get(seq as usize)?))
            .collect();
        rtts.sort();
        Ok(Echo { sent: sent.len() as u32, rtts })
    })
}

/// Sends request `i` at `start + i * interval`; returns when each left.
fn send(client: &UdpSocket, count: u32, interval: Duration) -> io::Result<Vec<Instant>> {
    let start = Instant::now();
    let mut sent = Vec::with_capacity(count as usize);
    let mut request = [0u8; SIZE];
    for seq in 0..count {
        let due = start + interval * seq;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        request[..4].copy_from_slice(&seq.to_le_bytes());
        sent.push(Instant::now());
        client.send(&request)?;
    }
    Ok(sent)
}

/// Collects (sequence number, arrival) of every answer until `done`.
fn receive(client: &UdpSocket, done: &AtomicBool, answered: &AtomicU32) -> io::Result<Vec<(u32, Instant)>> {
    let mut got = Vec::new();
    let mut answer = [0u8; SIZE];
    while !done.load(Ordering::Relaxed) {
        match client.recv(&mut answer) {
            Ok(n) if n >= 4 => {
                let at = Instant::now();
                got.push((u32::from_le_bytes([answer[0], answer[1], answer[2], answer[3]]), at));
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn serve(server: &UdpSocket, done: &AtomicBool) -> io::Result<()> {
    let mut buf = [0u8; SIZE];
    while !done.load(Ordering::Relaxed) {
        match server.recv_from(&mut buf) {
            Ok((n, from)) => {
                server.send_to(&buf[..n], from)?;
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs `f` with the relay's timing (see [`relay::realtime`]), so that the
/// round trips measure the link, not a build that shares the cores.
/// Without it (no CAP_SYS_NICE) they still measure, less steadily.
fn realtime<T>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let _ = relay::realtime();
    f()
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}
