//! The relay: one thread that moves IP packets between the two TUN devices
//! through a [`Shaper`] per direction. It reads every packet as soon as the
//! kernel hands it over, decides its fate, and holds the survivors in a
//! first-in first-out delay line per direction until their time (their
//! times only grow: the delay is constant and the wire sends in order), then
//! writes them to the other device.
//!
//! Timing: the thread waits in `ppoll` with a nanosecond timeout, the time
//! to the next packet due, and its timer slack is set to 1 ns (the default
//! 50 µs would let the kernel batch its wake-ups), so a packet leaves within
//! the machine's wake-up latency of its time (tens of µs here; counted in
//! [`DirCounters::late`]). A thread rather than an async runtime: tokio's
//! timer rounds to whole milliseconds. The thread has real-time priority
//! ([`PRIORITY`]), as netem's timers run in softirq ahead of every
//! process: a build on the same two cores would otherwise stretch the
//! link's delays by milliseconds.

use std::collections::VecDeque;
use std::io::{self, PipeReader};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::shaper::{Shaper, Verdict};
use crate::{DirCounters, Spec};

/// The relay's real-time priority (SCHED_FIFO, low): it runs before any
/// ordinary process. The kernel's real-time throttling still leaves the
/// others 5% of each core should it ever spin.
const PRIORITY: libc::c_int = 10;
/// A packet handed over this much after its time counts as late.
pub const LATE: Duration = Duration::from_micros(200);
/// The delay line of one direction holds at most this many bytes: without
/// a rate limit nothing else bounds it.
const DELAY_LINE_LIMIT: usize = 64 << 20;
/// Packets read from one device before the relay looks at the clock again.
const READ_BATCH: usize = 64;
/// Large enough for any packet a TUN device hands over.
const MAX_PACKET: usize = 65_536;
/// Spare packet buffers kept for reuse.
const SPARE_BUFFERS: usize = 4096;

/// The relay's counters, shared with the [`Link`](crate::Link).
#[derive(Debug, Default)]
pub struct Shared {
    /// Index 0: from the laptop side's device to the cluster side's; 1: back.
    pub dirs: [Atomics; 2],
    /// The relay thread's id, for its CPU time.
    pub tid: AtomicI32,
}

#[derive(Debug, Default)]
pub struct Atomics {
    forwarded: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    failed_writes: AtomicU64,
    late: AtomicU64,
    max_late_ns: AtomicU64,
}

impl Atomics {
    pub fn snapshot(&self) -> DirCounters {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirCounters {
            forwarded: get(&self.forwarded),
            bytes: get(&self.bytes),
            lost: get(&self.lost),
            queue_drops: get(&self.queue_drops),
            failed_writes: get(&self.failed_writes),
            late: get(&self.late),
            max_late: Duration::from_nanos(get(&self.max_late_ns)),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// One direction: its rules and the packets on their way.
struct Direction {
    shaper: Shaper,
    line: VecDeque<(Instant, Vec<u8>)>,
    line_bytes: usize,
}

/// Starts the relay between `tuns` (laptop side, cluster side). It runs
/// until `stop` reads end-of-file, i.e. until its writer is dropped.
pub fn spawn(tuns: [OwnedFd; 2], spec: Spec, shared: Arc<Shared>, stop: PipeReader) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("wanlink relay".into()).spawn(move || {
        // SAFETY: gettid has no arguments and no failure.
        shared.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
        if let Err(e) = realtime() {
            eprintln!("wanlink: the relay runs without real-time priority: {e}");
        }
        let dirs = [0, 1].map(|_| Direction { shaper: Shaper::new(&spec), line: VecDeque::new(), line_bytes: 0 });
        if let Err(e) = run(&tuns, dirs, &shared, &stop) {
            eprintln!("wanlink relay stopped: {e}");
        }
    })
}

/// Gives the calling thread the relay's timing: real-time priority
/// [`PRIORITY`] and a timer slack of 1 ns.
pub fn realtime() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: PRIORITY };
    // SAFETY: prctl with integer arguments; sched_setscheduler on this
    // thread (0) with a live sched_param.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn run(tuns: &[OwnedFd; 2], mut dirs: [Direction; 2], shared: &Shared, stop: &PipeReader) -> io::Result<()> {
    let mut rng = SmallRng::from_os_rng();
    let mut buf = vec![0u8; MAX_PACKET];
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let raw = [tuns[0].as_raw_fd(), tuns[1].as_raw_fd()];
    loop {
        // Hand over what is due.
        let now = Instant::now();
        for (i, dir) in dirs.iter_mut().enumerate() {
            let counters = &shared.dirs[i];
            while let Some((at, _)) = dir.line.front()
                && *at <= now
            {
                let Some((at, packet)) = dir.line.pop_front() else { break };
                dir.line_bytes -= packet.len();
                if write(raw[1 - i], &packet) {
                    Atomics::add(&counters.forwarded, 1);
                    Atomics::add(&counters.bytes, packet.len() as u64);
                } else {
                    Atomics::add(&counters.failed_writes, 1);
                }
                let late = now - at;
                if late > LATE {
                    Atomics::add(&counters.late, 1);
                }
                counters.max_late_ns.fetch_max(late.as_nanos() as u64, Ordering::Relaxed);
                if spare.len() < SPARE_BUFFERS {
                    spare.push(packet);
                }
            }
        }

        // Sleep until the next packet is due or a device has one to read.
        let next = dirs.iter().filter_map(|d| d.line.front().map(|(at, _)| *at)).min();
        let mut fds =
            [raw[0], raw[1], stop.as_raw_fd()].map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        let timeout = next.map(|at| {
            let wait = at.saturating_duration_since(Instant::now());
            libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as libc::c_long }
        });
        let timeout_ptr = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `fds` is a live array of 3 pollfds; the timeout, when
        // given, lives until the call returns; no signal mask.
        let ready = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ptr, std::ptr::null()) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[2].revents != 0 {
            return Ok(());
        }

        // Take in what the kernels sent.
        for (i, dir) in dirs.iter_mut().enumerate() {
            if fds[i].revents & libc::POLLIN == 0 {
                continue;
            }
            let counters = &shared.dirs[i];
            for _ in 0..READ_BATCH {
                let Some(len) = read(raw[i], &mut buf)? else { break };
                let arrived = Instant::now();
                let draw = if dir.shaper.loses() { rng.random::<f64>() } else { 1.0 };
                match dir.shaper.admit(arrived, len, draw) {
                    Verdict::Lost => Atomics::add(&counters.lost, 1),
                    Verdict::QueueFull => Atomics::add(&counters.queue_drops, 1),
                    Verdict::Deliver(_) if dir.line_bytes + len > DELAY_LINE_LIMIT => {
                        Atomics::add(&counters.queue_drops, 1)
                    }
                    Verdict::Deliver(at) => {
                        let mut packet = spare.pop().unwrap_or_default();
                        packet.clear();
                        packet.extend_from_slice(&buf[..len]);
                        dir.line_bytes += len;
                        dir.line.push_back((at, packet));
                    }
                }
            }
        }
    }
}

/// One packet from a non-blocking TUN descriptor; `None` when none waits.
fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: reading into a valid, writable buffer of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(e),
    }
}

/// Writes one packet; false if the device refused it (the packet is lost,
/// as on a NIC whose queue is full).
fn write(fd: RawFd, packet: &[u8]) -> bool {
    // SAFETY: writing from a valid buffer of packet.len() bytes.
    unsafe { libc::write(fd, packet.as_ptr().cast(), packet.len()) == packet.len() as isize }
}
