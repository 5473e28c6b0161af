//! What each tunnelled connection keeps in flight towards the sidecar: its
//! send buffer and congestion control, by the transport that carries the
//! tunnel when the connection opens.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use smoltcp::socket::tcp::CongestionControl;

/// The send buffer bounds data in flight towards the sidecar. Over a
/// stream transport nothing is lost inside the tunnel (the stream has its
/// own congestion control), so a connection sends up to this much without
/// a congestion controller of its own.
const TX_BUFFER_STREAM: usize = 1024 * 1024;
/// Over UDP datagrams are lost when bursts overflow the sidecar's socket
/// buffer, and smoltcp recovers a burst loss only with its 1 s minimum RTO:
/// connections use Reno and keep at most this much in flight. The sidecar
/// forces its buffer to `TUNNEL_UDP_RECEIVE_BUFFER` (8 MiB), which holds
/// this window for a dozen connections at once. Where it cannot (rootless
/// Docker), its control hello reports a smaller buffer and
/// [`SendWindow::fit_udp`] shrinks the window to match.
const TX_BUFFER_UDP_MAX: usize = 512 * 1024;
/// The least a connection over UDP keeps in flight, whatever the buffer.
const TX_BUFFER_UDP_MIN: usize = 64 * 1024;

/// What each connection opened from now on keeps in flight towards the
/// sidecar, by the transport that carries the tunnel now. One per agent,
/// shared by the transports (which carried the peer's last packet), the
/// control service (the sidecar's UDP receive buffer) and the stack (which
/// sizes a connection as its SYN arrives).
#[derive(Debug)]
pub struct SendWindow {
    /// Whether the transport that last carried the peer's packets is lossy
    /// (UDP): connections then use Reno and the UDP window.
    lossy: AtomicBool,
    /// What a connection over UDP keeps in flight, set by [`SendWindow::fit_udp`].
    udp: AtomicUsize,
}

impl Default for SendWindow {
    fn default() -> Self {
        SendWindow { lossy: AtomicBool::new(false), udp: AtomicUsize::new(TX_BUFFER_UDP_MAX) }
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

    /// Sizes what each connection opened from now on keeps in flight over
    /// UDP to the sidecar's receive buffer (bytes as its kernel reports
    /// them); returns the window.
    pub fn fit_udp(&self, receive_buffer: usize) -> usize {
        let window = udp_window_for(receive_buffer);
        self.udp.store(window, Ordering::Relaxed);
        window
    }

    /// The send buffer and congestion control of a connection opening now.
    pub fn for_new_connection(&self) -> (usize, CongestionControl) {
        if self.lossy.load(Ordering::Relaxed) {
            (self.udp.load(Ordering::Relaxed), CongestionControl::Reno)
        } else {
            (TX_BUFFER_STREAM, CongestionControl::None)
        }
    }
}

/// A quarter of the reported buffer: half of it is the kernel's
/// bookkeeping, and a datagram takes about twice its size of the rest.
/// With the default 208 KiB `rmem_max` that is 104 KiB, near the 96 KiB
/// that measured best with that buffer (a 100 MiB download in 3-4 s,
/// where 512 KiB took 13 s).
fn udp_window_for(receive_buffer: usize) -> usize {
    (receive_buffer / 4).clamp(TX_BUFFER_UDP_MIN, TX_BUFFER_UDP_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffers a sidecar reports: forced to 8 MiB (16 MiB as the
    /// kernel reports it), capped at the default `rmem_max` (rootless
    /// Docker), and a host with an even smaller cap.
    #[test]
    fn the_udp_window_follows_the_sidecar_receive_buffer() {
        assert_eq!(udp_window_for(16 << 20), TX_BUFFER_UDP_MAX);
        assert_eq!(udp_window_for(2 * 212_992), 104 * 1024);
        assert_eq!(udp_window_for(2 * 4096), TX_BUFFER_UDP_MIN);
    }

    /// A connection is sized by the transport that carried the last packet
    /// when its SYN arrives, with the window the sidecar's hello fitted.
    #[test]
    fn new_connections_follow_the_transport_now_in_use() {
        let window = SendWindow::default();
        assert_eq!(window.for_new_connection(), (TX_BUFFER_STREAM, CongestionControl::None));
        window.set_lossy(true);
        assert_eq!(window.for_new_connection(), (TX_BUFFER_UDP_MAX, CongestionControl::Reno));
        assert_eq!(window.fit_udp(2 * 212_992), 104 * 1024);
        assert_eq!(window.for_new_connection(), (104 * 1024, CongestionControl::Reno));
        window.set_lossy(false);
        assert_eq!(window.for_new_connection(), (TX_BUFFER_STREAM, CongestionControl::None));
    }
}
