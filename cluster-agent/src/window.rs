//! What each tunnelled connection keeps in flight towards the sidecar: its
//! send buffer and congestion control, by the transport that carries the
//! tunnel when the connection opens and by the tunnel's round trip.
//!
//! smoltcp's sender keeps at most its send buffer in flight, and a buffer
//! cannot grow once the socket exists, so each connection's is sized as
//! its SYN arrives: over a stream transport, enough for [`PATH_RATE`]
//! over the round trip the last handshakes took ([`PathWindows`]), within
//! bounds, and what goes above the floor comes from one budget for the
//! whole stack ([`BUDGET_ABOVE_FLOOR`]). Its receive buffer, the window
//! it offers the sidecar for uploads, is sized the same way over either
//! transport ([`RX_FLOOR`]). Over UDP the send window stays fitted
//! to the sidecar's buffer whatever the path: smoltcp does not pace, so a
//! connection's window leaves as one burst, and larger bursts were lost
//! (see [`TX_UDP_MAX`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use smoltcp::socket::tcp::CongestionControl;

/// Over a stream transport nothing is lost inside the tunnel (the stream
/// has its own congestion control), so a connection sends its whole send
/// buffer without a congestion controller of its own. Every connection
/// gets at least this much, what it got before buffers followed the path.
const TX_STREAM_FLOOR: usize = 1024 * 1024;
/// At most this much per connection over a stream: [`PATH_RATE`] for
/// 67 ms. More only queues in the stream: with no congestion control of
/// its own a connection's whole buffer enters the tunnel at once, ahead
/// of other connections' packets (at 100 Mbit/s 8 MiB is 0.7 s).
const TX_STREAM_MAX: usize = 8 * 1024 * 1024;
/// Over UDP datagrams are lost when bursts overflow a queue on the way
/// (the sidecar's socket buffer, a device's queue), and smoltcp recovers a
/// burst loss only with its 1 s minimum RTO: connections use Reno, and keep
/// in flight at most a quarter of the sidecar's buffer (see
/// [`udp_cap_for`]) and never more than this. The sidecar forces its
/// buffer to `TUNNEL_UDP_RECEIVE_BUFFER` (8 MiB, 16 MiB as its kernel
/// reports it), so this is the window unless it could not (rootless
/// Docker), when its control hello reports a smaller buffer and
/// [`SendWindow::fit_udp`] lowers it to match. A window sized to the path
/// (2.5 MB at 20 ms) made one stream over UDP 4.5x slower in the WAN lab
/// (38 against 172 Mbit/s; the relay counted no loss, so the bursts were
/// lost in a queue before or after it; BENCHMARKS.md).
const TX_UDP_MAX: usize = 512 * 1024;
/// The least a connection over UDP keeps in flight, whatever the buffer.
const TX_UDP_MIN: usize = 64 * 1024;
/// The rate a connection's send buffer covers over the round trip: about
/// what one stream through the tunnel reaches in the WAN lab with no loss
/// (BENCHMARKS.md). 125 bytes per microsecond is 1 Gbit/s.
const PATH_RATE: u64 = 125;
/// Send buffer above their floor that all the stack's connections hold at
/// once. A socket's buffer is allocated whole as its SYN arrives, and a
/// ring that wrapped once has touched all of it, so this bounds what
/// connections can hold beyond the floor: a few bulk transfers get their
/// full window, more share what is left, and none gets less than its floor.
const BUDGET_ABOVE_FLOOR: usize = 32 * 1024 * 1024;
/// Every connection's receive buffer, the window it offers the sidecar,
/// is at least this; sized to the path up to [`RX_MAX`], from a budget of
/// its own ([`BUDGET_ABOVE_FLOOR`] again). The sender of an upload is the
/// developer's kernel TCP, with its own congestion control over either
/// transport, so unlike a send window this is safe over UDP too. A fixed
/// 512 KiB held one upload at 20 ms to 25 MiB/s (writes to a volume over
/// the WAN lab's link: 19.6-21.9 MiB/s, BENCHMARKS.md).
const RX_FLOOR: usize = 512 * 1024;
const RX_MAX: usize = 8 * 1024 * 1024;
/// Handshake round trips kept. The estimate is their least: one handshake
/// slowed by a queue (a bulk transfer ahead of it in the tunnel) or by a
/// resent SYN|ACK does not inflate it, and a changed path shows within
/// this many connections.
const RTT_SAMPLES: usize = 8;

/// Which transport carries the tunnel now, and what the sidecar's UDP
/// buffer allows. One per agent, shared by the transports (which carried
/// the peer's last packet), the control service (the sidecar's UDP
/// receive buffer) and the stack (which sizes a connection as its SYN
/// arrives, with [`PathWindows`]).
#[derive(Debug)]
pub struct SendWindow {
    /// Whether the transport that last carried the peer's packets is lossy
    /// (UDP): connections then use Reno and the UDP bounds.
    lossy: AtomicBool,
    /// The most a connection over UDP keeps in flight, set by [`SendWindow::fit_udp`].
    udp_cap: AtomicUsize,
}

impl Default for SendWindow {
    fn default() -> Self {
        SendWindow { lossy: AtomicBool::new(false), udp_cap: AtomicUsize::new(TX_UDP_MAX) }
    }
}

/// The bounds of a new connection's send buffer, and its congestion control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    floor: usize,
    cap: usize,
    congestion: CongestionControl,
}

impl Bounds {
    fn range(&self) -> (usize, usize) {
        (self.floor, self.cap)
    }
}

impl SendWindow {
    /// Records which kind of transport carries the tunnel now.
    pub fn set_lossy(&self, lossy: bool) {
        // Read first: this runs for every packet, and a store would bounce
        // the cache line between the transports' threads.
        if self.lossy.load(Ordering::Relaxed) != lossy {
            self.lossy.store(lossy, Ordering::Relaxed);
        }
    }

    /// Bounds what each connection opened from now on keeps in flight over
    /// UDP by the sidecar's receive buffer (bytes as its kernel reports
    /// them); returns the bound.
    pub fn fit_udp(&self, receive_buffer: usize) -> usize {
        let cap = udp_cap_for(receive_buffer);
        self.udp_cap.store(cap, Ordering::Relaxed);
        cap
    }

    fn bounds(&self) -> Bounds {
        if self.lossy.load(Ordering::Relaxed) {
            let cap = self.udp_cap.load(Ordering::Relaxed);
            Bounds { floor: cap, cap, congestion: CongestionControl::Reno }
        } else {
            Bounds { floor: TX_STREAM_FLOOR, cap: TX_STREAM_MAX, congestion: CongestionControl::None }
        }
    }
}

/// A quarter of the reported buffer: half of it is the kernel's
/// bookkeeping, and a datagram takes about twice its size of the rest.
/// With the default 208 KiB `rmem_max` that is 104 KiB, near the 96 KiB
/// that measured best with that buffer (a 100 MiB download in 3-4 s,
/// where 512 KiB took 13 s).
fn udp_cap_for(receive_buffer: usize) -> usize {
    (receive_buffer / 4).clamp(TX_UDP_MIN, TX_UDP_MAX)
}

/// A new connection's send and receive buffers and congestion control,
/// and what it holds of the budgets until [`PathWindows::close`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub tx: usize,
    pub rx: usize,
    pub congestion: CongestionControl,
    above_floor: Held,
}

/// Buffer held above the floors, send and receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Held {
    tx: usize,
    rx: usize,
}

/// The stack's view of the path: the tunnel's round trip as the last
/// handshakes took it, and the budget its connections hold. Owned by the
/// stack's engine.
#[derive(Debug, Default)]
pub struct PathWindows {
    rtts: VecDeque<Duration>,
    above_floor: Held,
}

impl PathWindows {
    /// Records one handshake's round trip: from the SYN|ACK to the ACK.
    pub fn on_handshake(&mut self, rtt: Duration) {
        if self.rtts.len() == RTT_SAMPLES {
            self.rtts.pop_front();
        }
        self.rtts.push_back(rtt);
    }

    /// The tunnel's round trip: the least of the recent handshakes'.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtts.iter().min().copied()
    }

    /// Sizes a connection opening now over the transport `shared` names.
    pub fn open(&mut self, shared: &SendWindow) -> Grant {
        let bounds = shared.bounds();
        let left = |held: usize| BUDGET_ABOVE_FLOOR.saturating_sub(held);
        let tx = size(self.rtt(), bounds.range(), left(self.above_floor.tx));
        let rx = size(self.rtt(), (RX_FLOOR, RX_MAX), left(self.above_floor.rx));
        let above_floor = Held { tx: tx - bounds.floor, rx: rx - RX_FLOOR };
        self.above_floor.tx += above_floor.tx;
        self.above_floor.rx += above_floor.rx;
        Grant { tx, rx, congestion: bounds.congestion, above_floor }
    }

    /// Returns what a connection that is gone held of the budgets.
    pub fn close(&mut self, grant: &Grant) {
        self.above_floor.tx -= grant.above_floor.tx;
        self.above_floor.rx -= grant.above_floor.rx;
    }
}

/// [`PATH_RATE`] over `rtt`, within `(floor, cap)`, taking no more than
/// `budget` above the floor. Without a round trip yet, the floor.
fn size(rtt: Option<Duration>, (floor, cap): (usize, usize), budget: usize) -> usize {
    let Some(rtt) = rtt else { return floor };
    let bdp = usize::try_from(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).saturating_mul(PATH_RATE))
        .unwrap_or(usize::MAX);
    let want = bdp.clamp(floor, cap.max(floor));
    floor + (want - floor).min(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The buffers a sidecar reports: forced to 8 MiB (16 MiB as the
    /// kernel reports it), capped at the default `rmem_max` (rootless
    /// Docker), and a host with an even smaller cap.
    #[test]
    fn the_udp_cap_follows_the_sidecar_receive_buffer() {
        assert_eq!(udp_cap_for(16 << 20), TX_UDP_MAX);
        assert_eq!(udp_cap_for(2 * 212_992), 104 * 1024);
        assert_eq!(udp_cap_for(2 * 4096), TX_UDP_MIN);
    }

    /// 1 Gbit/s over the round trip, within the transport's floor and cap.
    #[test]
    fn a_send_buffer_covers_the_path_rate_over_the_round_trip() {
        let stream = SendWindow::default().bounds().range();
        assert_eq!(size(None, stream, usize::MAX), MIB, "no round trip yet: the floor");
        assert_eq!(size(Some(ms(1)), stream, usize::MAX), MIB);
        assert_eq!(size(Some(ms(20)), stream, usize::MAX), 2_500_000);
        assert_eq!(size(Some(ms(50)), stream, usize::MAX), 6_250_000);
        assert_eq!(size(Some(ms(80)), stream, usize::MAX), 8 * MIB);
        assert_eq!(size(Some(ms(50)), stream, MIB), 2 * MIB, "no more than the budget above the floor");
        assert_eq!(size(Some(ms(50)), stream, 0), MIB, "the floor, whatever the budget");
    }

    /// Over UDP the window is what the sidecar's buffer allows, whatever
    /// the round trip.
    #[test]
    fn the_udp_window_is_fitted_to_the_buffer_not_the_path() {
        let shared = SendWindow::default();
        shared.set_lossy(true);
        assert_eq!(size(Some(ms(20)), shared.bounds().range(), usize::MAX), TX_UDP_MAX);
        assert_eq!(shared.fit_udp(2 * 212_992), 104 * 1024);
        assert_eq!(size(Some(ms(20)), shared.bounds().range(), usize::MAX), 104 * 1024);
        assert_eq!(size(None, shared.bounds().range(), usize::MAX), 104 * 1024);
    }

    /// The estimate is the least recent handshake, so a slow one passes
    /// and a changed path shows once the old samples are gone.
    #[test]
    fn the_round_trip_is_the_least_of_the_recent_handshakes() {
        let mut path = PathWindows::default();
        assert_eq!(path.rtt(), None);
        path.on_handshake(ms(20));
        path.on_handshake(ms(1000));
        assert_eq!(path.rtt(), Some(ms(20)));
        (0..RTT_SAMPLES).for_each(|_| path.on_handshake(ms(50)));
        assert_eq!(path.rtt(), Some(ms(50)));
    }

    /// Connections take from the budget what they hold above the floor
    /// and give it back as they go; the last ones get only the floor.
    #[test]
    fn connections_share_the_budget_above_their_floor() {
        let (shared, mut path) = (SendWindow::default(), PathWindows::default());
        path.on_handshake(ms(80));
        let full: Vec<Grant> = (0..4).map(|_| path.open(&shared)).collect();
        assert!(full.iter().all(|g| g.tx == 8 * MIB && g.congestion == CongestionControl::None));
        assert_eq!(path.open(&shared).tx, 5 * MIB, "4 x 7 MiB of the 32 MiB taken: 4 MiB left");
        let floor = path.open(&shared);
        assert_eq!(floor.tx, MIB);
        path.close(&full[0]);
        path.close(&floor);
        assert_eq!(path.open(&shared).tx, 8 * MIB);
    }

    /// A connection is sized by the transport that carried the last packet
    /// when its SYN arrives, with the cap the sidecar's hello fitted.
    #[test]
    fn new_connections_follow_the_transport_now_in_use() {
        let (shared, mut path) = (SendWindow::default(), PathWindows::default());
        path.on_handshake(ms(20));
        assert_eq!(path.open(&shared).congestion, CongestionControl::None);
        shared.set_lossy(true);
        let udp = path.open(&shared);
        assert_eq!((udp.tx, udp.congestion), (TX_UDP_MAX, CongestionControl::Reno));
        shared.set_lossy(false);
        assert_eq!(path.open(&shared).congestion, CongestionControl::None);
    }

    /// The window offered for uploads follows the path over either
    /// transport (the developer's kernel TCP sends them, with its own
    /// congestion control), from a budget of its own.
    #[test]
    fn the_receive_window_follows_the_path_over_either_transport() {
        let (shared, mut path) = (SendWindow::default(), PathWindows::default());
        assert_eq!(path.open(&shared).rx, RX_FLOOR, "no round trip yet");
        path.on_handshake(ms(20));
        assert_eq!(path.open(&shared).rx, 2_500_000);
        shared.set_lossy(true);
        let udp = path.open(&shared);
        assert_eq!((udp.tx, udp.rx), (TX_UDP_MAX, 2_500_000));
        let near = PathWindows { rtts: [ms(1)].into(), ..PathWindows::default() }.open(&shared);
        assert_eq!(near.rx, RX_FLOOR, "a near path keeps the floor");
    }
}
