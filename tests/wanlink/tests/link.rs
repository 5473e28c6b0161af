//! The emulated link, checked as a user of the WAN lab would check it:
//! round trips take the asked RTT, the asked share of them is lost, and
//! one TCP stream gets the asked rate and no more. Each figure is within
//! 10% of what was asked, with enough packets that a correct link fails
//! the check less than once in a million runs.
//!
//! Needs root and /dev/net/tun, so `#[ignore]`d; `cargo xtask test` runs
//! them. One link at a time (see [`one_at_a_time`]): the figures are the
//! relay's timing, not a contest for the machine's cores.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tpd_wanlink::{Link, Side, Spec};

fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn within(measured: f64, asked: f64, tolerance: f64) -> bool {
    (measured - asked).abs() <= asked * tolerance
}

#[test]
#[ignore = "needs root and /dev/net/tun; `cargo xtask test` runs it"]
fn round_trips_take_the_asked_rtt() {
    let _one = one_at_a_time();
    for rtt in [ms(20), ms(50)] {
        let link = Link::up(Spec { rtt, loss: 0.0, rate_mbit: None }).unwrap();
        let echo = link.echo(1000, ms(2)).unwrap();
        let p50 = echo.percentile(0.5).unwrap();
        let p99 = echo.percentile(0.99).unwrap();
        eprintln!("asked {rtt:?}: p50 {p50:?}, p99 {p99:?}, min {:?}; {:?}", echo.rtts[0], link.counters());
        assert_eq!(echo.received(), echo.sent, "a link without loss lost round trips");
        assert!(within(p50.as_secs_f64(), rtt.as_secs_f64(), 0.1), "p50 {p50:?} is not within 10% of {rtt:?}");
        assert!(echo.rtts[0] >= rtt, "a round trip took {:?}, less than the asked {rtt:?}", echo.rtts[0]);
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun; `cargo xtask test` runs it"]
fn the_asked_share_of_round_trips_is_lost() {
    let _one = one_at_a_time();
    let spec = Spec { rtt: ms(2), loss: 0.05, rate_mbit: None };
    let link = Link::up(spec).unwrap();
    // A round trip is lost with q = 1 - 0.95² = 9.75%. Over n = 60,000 the
    // lost count has a relative standard deviation of sqrt((1-q)/(n q)) =
    // 1.2%, so 10% is 8 of them; each direction's 5% (on 60,000 and about
    // 57,000 packets) has 1.8%, so 10% is 5.5 of them (a false failure
    // about once in 16 million runs).
    let echo = link.echo(60_000, Duration::from_micros(150)).unwrap();
    let counters = link.counters();
    eprintln!("round-trip loss {:.4} (asked {:.4}); {counters:?}", echo.loss(), spec.round_trip_loss());
    let (out, back) = (counters.laptop_to_cluster, counters.cluster_to_laptop);
    // The link lost them, not a socket's buffer on the way.
    assert_eq!(u64::from(echo.sent - echo.received()), out.lost + back.lost, "round trips lost elsewhere");
    assert!(
        within(echo.loss(), spec.round_trip_loss(), 0.1),
        "round-trip loss {:.4} is not within 10% of {:.4}",
        echo.loss(),
        spec.round_trip_loss()
    );
    for (way, dir) in [("laptop to cluster", out), ("cluster to laptop", back)] {
        let loss = dir.lost as f64 / (dir.lost + dir.forwarded) as f64;
        assert!(within(loss, spec.loss, 0.1), "{way}: loss {loss:.4} is not within 10% of {}", spec.loss);
    }
}

#[test]
#[ignore = "needs root and /dev/net/tun; `cargo xtask test` runs it"]
fn one_tcp_stream_gets_the_rate_and_no_more() {
    let _one = one_at_a_time();
    const BYTES: usize = 24 << 20;
    let rate_mbit = 50.0;
    let link = Link::up(Spec { rtt: ms(4), loss: 0.0, rate_mbit: Some(rate_mbit) }).unwrap();
    let listener =
        link.enter(Side::Cluster, || TcpListener::bind(SocketAddr::from((Side::Cluster.addr(), 0)))).unwrap();
    let listener = listener.unwrap();
    listener.set_nonblocking(true).unwrap();
    let server_addr = listener.local_addr().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(ms(10))
                    }
                    Err(e) => panic!("the client did not connect: {e}"),
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
            let chunk = vec![0u8; 1 << 16];
            for _ in 0..BYTES / chunk.len() {
                conn.write_all(&chunk).unwrap();
            }
        });
        let mut conn = link
            .enter(Side::Laptop, move || TcpStream::connect_timeout(&server_addr, Duration::from_secs(5)))
            .unwrap()
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let (mut got, mut first) = (0, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while got < BYTES {
            assert!(Instant::now() < deadline, "{got} of {BYTES} bytes in 60 s");
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended after {got} of {BYTES} bytes");
            first.get_or_insert_with(Instant::now);
            got += n;
        }
        let secs = first.unwrap().elapsed().as_secs_f64();
        let mbit = got as f64 * 8.0 / secs / 1e6;
        let counters = link.counters();
        eprintln!(
            "{mbit:.1} Mbit/s of TCP payload at {rate_mbit} Mbit/s; relay CPU {:?}; {counters:?}",
            link.relay_cpu()
        );
        // TCP's payload is at most 1448 of each 1500 bytes on the wire (96.5%).
        assert!(mbit <= rate_mbit, "{mbit:.1} Mbit/s over a {rate_mbit} Mbit/s link");
        assert!(mbit >= 0.85 * rate_mbit, "{mbit:.1} Mbit/s is more than 15% below {rate_mbit} Mbit/s");
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun; `cargo xtask test` runs it"]
fn dropping_the_link_removes_its_namespaces_even_in_a_panic() {
    let _one = one_at_a_time();
    let exists = |name: &str| Path::new("/run/netns").join(name).exists();
    let spec = Spec { rtt: ms(1), loss: 0.0, rate_mbit: None };

    let link = Link::up(spec).unwrap();
    let names = [link.netns(Side::Laptop).to_string(), link.netns(Side::Cluster).to_string()];
    assert!(names.iter().all(|n| exists(n)), "{names:?} were not created");
    drop(link);
    assert!(!names.iter().any(|n| exists(n)), "{names:?} remain after the drop");

    let seen = Mutex::new(Vec::new());
    let unwound = std::panic::catch_unwind(|| {
        let link = Link::up(spec).unwrap();
        seen.lock().unwrap().extend([link.netns(Side::Laptop).to_string(), link.netns(Side::Cluster).to_string()]);
        panic!("deliberate: the link must go even when a test panics");
    });
    assert!(unwound.is_err());
    let names = seen.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert!(!names.iter().any(|n| exists(n)), "{names:?} remain after the panic");
}
