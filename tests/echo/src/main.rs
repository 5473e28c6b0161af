//! `tpd-echo`: the server inside the `tpd-test/echo` image. It answers HTTP,
//! raw TCP and UDP and always reports the client address it saw, so a test
//! can tell which way its traffic really went. Std only, one thread per
//! connection: small, static, and good for hundreds of concurrent clients.
//!
//! - HTTP/1.1 on `--http PORT` (8080): `GET /` greets with the host name and
//!   client address, `GET /client` gives the address alone, `GET /bytes/N`
//!   sends N bytes, `POST /sha256` answers the hex sha256 of the body.
//!   Keep-alive is honoured.
//! - TCP on `--echo PORT` (9000): every byte is sent back.
//! - UDP on the same `--echo PORT`: each datagram is answered with
//!   `client=IP:PORT\n` followed by the datagram, or, for a datagram
//!   `bytes:N`, by N bytes of `x` (a large answer to a small question, as a
//!   DNS server gives).
//! - With `--forward PORT=ADDR`, nothing of the above: every TCP connection
//!   to PORT is relayed to ADDR. Run in another container's network
//!   namespace (`--network container:X`) as `--forward 7710=127.0.0.1:7700`,
//!   it lets a test reach X's loopback from outside, which is where tpd's
//!   agent admits transport streams (where a kubelet's port-forward lands).

// Property tests unwrap inside proptest!, which clippy does not see as a test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;

use sha2::{Digest, Sha256};

const USAGE: &str = "usage: tpd-echo [--http PORT] [--echo PORT] | tpd-echo --forward PORT=ADDR:PORT";

/// What to run: the echo servers, or only a TCP forwarder.
#[derive(Debug, PartialEq)]
enum Mode {
    Serve { http: u16, echo: u16 },
    Forward { listen: u16, to: SocketAddr },
}

fn main() {
    match parse_args(std::env::args().skip(1)) {
        Ok(Mode::Serve { http, echo }) => serve(http, echo),
        Ok(Mode::Forward { listen, to }) => forward(listen, to),
        Err(msg) => {
            eprintln!("tpd-echo: {msg}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

fn serve(http_port: u16, echo_port: u16) {
    let http = bind_tcp(http_port);
    let echo = bind_tcp(echo_port);
    let udp = UdpSocket::bind(("0.0.0.0", echo_port)).unwrap_or_else(|e| die("bind udp", e));
    println!("tpd-echo: http on {http_port}, tcp+udp echo on {echo_port}");
    thread::spawn(move || accept_loop(echo, echo_conn));
    thread::spawn(move || udp_loop(&udp));
    accept_loop(http, http_conn);
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Mode, String> {
    let (mut http, mut echo, mut forward) = (8080, 9000, None);
    while let Some(flag) = args.next() {
        if !matches!(flag.as_str(), "--http" | "--echo" | "--forward") {
            return Err(format!("unknown argument {flag:?}"));
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let port = |v: &str| v.parse::<u16>().map_err(|_| format!("{flag}: {v:?} is not a port"));
        match flag.as_str() {
            "--http" => http = port(&value)?,
            "--echo" => echo = port(&value)?,
            _ => {
                let (listen, to) = value.split_once('=').ok_or(format!("{flag}: {value:?} is not PORT=ADDR:PORT"))?;
                let to = to.parse().map_err(|_| format!("{flag}: {to:?} is not ADDR:PORT"))?;
                forward = Some(Mode::Forward { listen: port(listen)?, to });
            }
        }
    }
    Ok(forward.unwrap_or(Mode::Serve { http, echo }))
}

fn die(what: &str, e: io::Error) -> ! {
    eprintln!("tpd-echo: {what}: {e}");
    std::process::exit(1)
}

fn bind_tcp(port: u16) -> TcpListener {
    TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| die("bind tcp", e))
}

fn accept_loop(listener: TcpListener, serve: fn(TcpStream, SocketAddr) -> io::Result<()>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(peer) = conn.peer_addr() else { continue };
        // Heads and bodies go out in separate writes; a client must not
        // wait out Nagle's algorithm for the second.
        let _ = conn.set_nodelay(true);
        thread::spawn(move || serve(conn, peer));
    }
}

fn forward(listen: u16, to: SocketAddr) {
    let listener = bind_tcp(listen);
    println!("tpd-echo: forwarding tcp {listen} to {to}");
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        thread::spawn(move || relay(conn, to));
    }
}

/// Copies both ways until each side has ended; an end is passed on as a
/// half-close, so either side closing closes the other.
fn relay(client: TcpStream, to: SocketAddr) -> io::Result<()> {
    let upstream = TcpStream::connect(to)?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
    }
    let (mut from_client, mut to_upstream) = (client.try_clone()?, upstream.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut from_client, &mut to_upstream);
        to_upstream.shutdown(std::net::Shutdown::Write)
    });
    let (mut from_upstream, mut to_client) = (upstream, client);
    let _ = io::copy(&mut from_upstream, &mut to_client);
    to_client.shutdown(std::net::Shutdown::Write)?;
    up.join().map_err(|_| io::Error::other("the upstream copy panicked"))?
}

fn echo_conn(mut conn: TcpStream, _peer: SocketAddr) -> io::Result<()> {
    let mut reader = conn.try_clone()?;
    io::copy(&mut reader, &mut conn)?;
    conn.shutdown(std::net::Shutdown::Write)
}

fn udp_loop(sock: &UdpSocket) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = format!("client={peer}\n").into_bytes();
        match std::str::from_utf8(&buf[..n]).ok().and_then(|s| s.strip_prefix("bytes:")?.trim().parse().ok()) {
            Some(len) => reply.resize(reply.len() + usize::min(len, 60_000), b'x'),
            None => reply.extend_from_slice(&buf[..n]),
        }
        let _ = sock.send_to(&reply, peer);
    }
}

/// One parsed HTTP request head; bodies are read by the handler.
struct Head {
    method: String,
    path: String,
    content_length: u64,
    close: bool,
}

fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or("/").to_string();
    let mut head = Head { method, path, content_length: 0, close: line.contains("HTTP/1.0") };
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            return Ok(Some(head));
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => head.content_length = value.parse().unwrap_or(0),
            "connection" => head.close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
}

fn http_conn(conn: TcpStream, peer: SocketAddr) -> io::Result<()> {
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    while let Some(head) = read_head(&mut reader)? {
        let mut body = (&mut reader).take(head.content_length);
        respond(&head, &mut body, &mut out, peer)?;
        io::copy(&mut body, &mut io::sink())?;
        if head.close {
            break;
        }
    }
    Ok(())
}

fn respond(head: &Head, body: &mut impl Read, out: &mut TcpStream, peer: SocketAddr) -> io::Result<()> {
    let path = head.path.as_str();
    match (head.method.as_str(), path) {
        ("GET", "/") => {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            send(out, 200, format!("hello from {}\nclient={peer}\n", host.trim()).as_bytes())
        }
        ("GET", "/client") => send(out, 200, peer.to_string().as_bytes()),
        ("GET", p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<u64>() {
            Ok(n) => send_pattern(out, n),
            Err(_) => send(out, 400, b"bad byte count\n"),
        },
        ("POST", "/sha256") => {
            let mut hasher = Sha256::new();
            io::copy(body, &mut HashWriter(&mut hasher))?;
            send(out, 200, format!("{:x}\n", hasher.finalize()).as_bytes())
        }
        _ => send(out, 404, b"not found\n"),
    }
}

fn send(out: &mut TcpStream, status: u16, body: &[u8]) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    // One write: `write!` on the socket sends each piece of the head on its
    // own, and a keep-alive client then waits out Nagle and delayed ACKs
    // (40 ms a request).
    let mut response =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", body.len())
            .into_bytes();
    response.extend_from_slice(body);
    out.write_all(&response)
}

fn send_pattern(out: &mut TcpStream, n: u64) -> io::Result<()> {
    write!(out, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n")?;
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..take])?;
        left -= take as u64;
    }
    Ok(())
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> impl Iterator<Item = String> {
        list.iter().map(|s| s.to_string()).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn ports_default_and_override() {
        assert_eq!(parse_args(args(&[])), Ok(Mode::Serve { http: 8080, echo: 9000 }));
        assert_eq!(parse_args(args(&["--echo", "7", "--http", "80"])), Ok(Mode::Serve { http: 80, echo: 7 }));
    }

    #[test]
    fn forward_takes_a_port_and_an_address() {
        let to = "127.0.0.1:7700".parse().unwrap();
        assert_eq!(parse_args(args(&["--forward", "7710=127.0.0.1:7700"])), Ok(Mode::Forward { listen: 7710, to }));
        assert!(parse_args(args(&["--forward", "7710"])).unwrap_err().contains("PORT=ADDR:PORT"));
        assert!(parse_args(args(&["--forward", "7710=localhost"])).unwrap_err().contains("ADDR:PORT"));
    }

    #[test]
    fn relay_carries_both_ways_and_passes_the_end_on() {
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = upstream.local_addr().unwrap();
        thread::spawn(move || accept_loop(upstream, echo_conn));
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = front.local_addr().unwrap();
        thread::spawn(move || relay(front.accept().unwrap().0, to));
        let mut client = TcpStream::connect(at).unwrap();
        client.write_all(b"through the relay").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"through the relay");
    }

    #[test]
    fn bad_arguments_are_explained() {
        assert!(parse_args(args(&["--http"])).unwrap_err().contains("needs a value"));
        assert!(parse_args(args(&["--http", "x"])).unwrap_err().contains("not a port"));
        assert!(parse_args(args(&["-z"])).unwrap_err().contains("unknown"));
    }

    #[test]
    fn head_parsing_reads_length_and_connection() {
        let raw = b"POST /sha256 HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let mut reader = BufReader::new(&raw[..]);
        let head = read_head(&mut reader).unwrap().unwrap();
        assert_eq!((head.method.as_str(), head.path.as_str()), ("POST", "/sha256"));
        assert_eq!(head.content_length, 5);
        assert!(head.close);
    }
}
