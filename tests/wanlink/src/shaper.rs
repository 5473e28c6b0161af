//! What one direction of the link does to a packet: lose it, drop it at a
//! full queue, or deliver it at a given time. A pure function of the time
//! the packet arrives, its size and a uniform random draw, so the link's
//! rules are tested in memory (below); the relay owns the clock, the
//! devices and the random numbers.
//!
//! The model is a bottleneck link: a packet that survives the loss draw
//! waits for the wire to finish the packets ahead of it, takes
//! `size / rate` on the wire, then `rtt / 2` to cross. The queue in front
//! of the wire holds at most the bandwidth-delay product plus
//! [`QUEUE_SLACK`]; a packet that would overflow it is dropped (drop-tail),
//! as a router's buffer drops it. Without a rate the wire takes no time and
//! nothing queues.

use std::time::{Duration, Instant};

use crate::Spec;

/// Bytes the queue in front of a rate-limited wire holds beyond the
/// bandwidth-delay product: about 40 full-size packets, so that a link with
/// a small RTT still absorbs a burst.
pub const QUEUE_SLACK: usize = 64 * 1024;

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Lost on the way (the random draw).
    Lost,
    /// Dropped at the tail of a full queue.
    QueueFull,
    /// Leaves the far end at this time.
    Deliver(Instant),
}

/// One direction of the link.
#[derive(Debug)]
pub struct Shaper {
    delay: Duration,
    loss: f64,
    /// The wire's rate, in bytes per second.
    rate: Option<f64>,
    /// Bytes the queue in front of the wire may hold.
    queue_limit: f64,
    /// When the wire has sent every packet accepted so far.
    free_at: Option<Instant>,
}

impl Shaper {
    pub fn new(spec: &Spec) -> Shaper {
        let rate = spec.rate_mbit.map(|mbit| mbit * 1e6 / 8.0);
        let bdp = rate.map_or(0.0, |r| r * spec.rtt.as_secs_f64());
        Shaper { delay: spec.rtt / 2, loss: spec.loss, rate, queue_limit: bdp + QUEUE_SLACK as f64, free_at: None }
    }

    /// Whether packets are lost at all (the caller draws only then).
    pub fn loses(&self) -> bool {
        self.loss > 0.0
    }

    /// The fate of a packet of `len` bytes arriving at `now`; `draw` is
    /// uniform in [0, 1). Arrivals must come in time order.
    pub fn admit(&mut self, now: Instant, len: usize, draw: f64) -> Verdict {
        if draw < self.loss {
            return Verdict::Lost;
        }
        let Some(rate) = self.rate else { return Verdict::Deliver(now + self.delay) };
        let start = self.free_at.map_or(now, |free| free.max(now));
        let queued = (start - now).as_secs_f64() * rate;
        if queued + len as f64 > self.queue_limit {
            return Verdict::QueueFull;
        }
        let sent = start + Duration::from_secs_f64(len as f64 / rate);
        self.free_at = Some(sent);
        Verdict::Deliver(sent + self.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rtt_ms: u64, loss: f64, rate_mbit: Option<f64>) -> Spec {
        Spec { rtt: Duration::from_millis(rtt_ms), loss, rate_mbit }
    }

    fn at(verdict: Verdict) -> Instant {
        match verdict {
            Verdict::Deliver(at) => at,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    #[test]
    fn without_a_rate_every_packet_takes_half_the_rtt() {
        let mut shaper = Shaper::new(&spec(20, 0.0, None));
        let now = Instant::now();
        for i in 0..1000 {
            assert_eq!(at(shaper.admit(now, 1500, 0.5)), now + Duration::from_millis(10), "packet {i}");
        }
    }

    #[test]
    fn the_draw_decides_loss() {
        let mut shaper = Shaper::new(&spec(20, 0.05, None));
        let now = Instant::now();
        assert_eq!(shaper.admit(now, 100, 0.049), Verdict::Lost);
        assert!(matches!(shaper.admit(now, 100, 0.05), Verdict::Deliver(_)));
        let mut none = Shaper::new(&spec(20, 0.0, None));
        assert!(matches!(none.admit(now, 100, 0.0), Verdict::Deliver(_)));
    }

    #[test]
    fn a_rate_serialises_packets_back_to_back() {
        // 12 Mbit/s: 1500 bytes take 1 ms on the wire.
        let mut shaper = Shaper::new(&spec(10, 0.0, Some(12.0)));
        let now = Instant::now();
        for i in 1..=5 {
            let expected = now + Duration::from_millis(i) + Duration::from_millis(5);
            assert_eq!(at(shaper.admit(now, 1500, 0.5)), expected, "packet {i}");
        }
        // An idle wire sends a late packet at once.
        let later = now + Duration::from_secs(1);
        assert_eq!(at(shaper.admit(later, 1500, 0.5)), later + Duration::from_millis(6));
    }

    #[test]
    fn a_full_queue_drops_the_tail_and_drains_at_the_rate() {
        // 80 Mbit/s = 10 MB/s over 40 ms: 400 kB of BDP plus the slack.
        let mut shaper = Shaper::new(&spec(40, 0.0, Some(80.0)));
        let limit = 400_000 + QUEUE_SLACK;
        let now = Instant::now();
        let fits = limit / 1000;
        for i in 0..fits {
            assert!(matches!(shaper.admit(now, 1000, 0.5), Verdict::Deliver(_)), "packet {i} fits");
        }
        assert_eq!(shaper.admit(now, 1000, 0.5), Verdict::QueueFull);
        // 1 ms later the wire has sent 10 kB: ten more packets fit, not eleven.
        let later = now + Duration::from_millis(1);
        for _ in 0..10 {
            assert!(matches!(shaper.admit(later, 1000, 0.5), Verdict::Deliver(_)));
        }
        assert_eq!(shaper.admit(later, 1000, 0.5), Verdict::QueueFull);
    }

    #[test]
    fn lost_packets_take_no_room_on_the_wire() {
        let mut shaper = Shaper::new(&spec(10, 0.5, Some(12.0)));
        let now = Instant::now();
        assert_eq!(shaper.admit(now, 1500, 0.1), Verdict::Lost);
        assert_eq!(at(shaper.admit(now, 1500, 0.9)), now + Duration::from_millis(6));
    }
}
