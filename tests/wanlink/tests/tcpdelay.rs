//! The TCP delay relay, checked as `bench session` relies on it: a request
//! and its answer take the asked RTT (within 10%), a new connection's first
//! bytes wait one more RTT (the handshake), bytes keep their order, and the
//! HTTP request lines are noted. Loopback only, no root.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tpd_wanlink::TcpDelay;

/// A loopback echo server, one thread per connection.
fn echo_server() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Sends `msg` and reads it back: the time taken, and what came back.
fn round_trip(s: &mut TcpStream, msg: &[u8]) -> io::Result<(Duration, Vec<u8>)> {
    let started = Instant::now();
    s.write_all(msg)?;
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back)?;
    Ok((started.elapsed(), back))
}

fn within(measured: Duration, asked: Duration) -> bool {
    measured.abs_diff(asked) <= asked / 10
}

#[test]
fn round_trips_take_the_asked_rtt_and_connecting_one_more() {
    let rtt = Duration::from_millis(40);
    let relay = TcpDelay::start(echo_server().unwrap(), rtt).unwrap();
    let mut s = TcpStream::connect(relay.addr()).unwrap();
    s.set_nodelay(true).unwrap();
    let (first, back) = round_trip(&mut s, b"hello").unwrap();
    assert_eq!(back, b"hello");
    assert!(within(first, 2 * rtt), "first round trip {first:?}, asked handshake + {rtt:?}");
    let mut times: Vec<Duration> = (0..20).map(|_| round_trip(&mut s, b"ping").unwrap().0).collect();
    times.sort();
    let p50 = times[times.len() / 2];
    assert!(within(p50, rtt), "p50 {p50:?}, asked {rtt:?}");
}

#[test]
fn bytes_keep_their_order() {
    let relay = TcpDelay::start(echo_server().unwrap(), Duration::from_millis(10)).unwrap();
    let mut s = TcpStream::connect(relay.addr()).unwrap();
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut reader = s.try_clone().unwrap();
    let len = sent.len();
    let got = std::thread::spawn(move || {
        let mut got = vec![0; len];
        reader.read_exact(&mut got).unwrap();
        got
    });
    // Many small writes, so the relay queues many chunks each way.
    for piece in sent.chunks(1000) {
        s.write_all(piece).unwrap();
    }
    assert!(got.join().unwrap() == sent, "the bytes came back out of order");
}

#[test]
fn notes_http_request_lines() {
    let relay = TcpDelay::start(echo_server().unwrap(), Duration::ZERO).unwrap();
    let mut s = TcpStream::connect(relay.addr()).unwrap();
    let req = b"GET /api/v1/namespaces/default HTTP/1.1\r\nhost: x\r\n\r\n";
    round_trip(&mut s, req).unwrap();
    round_trip(&mut s, b"not a request line\r\n").unwrap();
    let lines: Vec<String> = relay.requests().into_iter().map(|r| r.line).collect();
    assert_eq!(lines, ["GET /api/v1/namespaces/default"]);
}
