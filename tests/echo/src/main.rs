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

// Property tests unwrap inside proptest!, which clippy does not see as a test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;

use sha2::{Digest, Sha256};

fn main() {
    let (http_port, echo_port) = match parse_args(std::env::args().skip(1)) {
        Ok(ports) => ports,
        Err(msg) => {
            eprintln!("tpd-echo: {msg}\nusage: tpd-echo [--http PORT] [--echo PORT]");
            std::process::exit(2);
        }
    };
    let http = bind_tcp(http_port);
    let echo = bind_tcp(echo_port);
    let udp = UdpSocket::bind(("0.0.0.0", echo_port)).unwrap_or_else(|e| die("bind udp", e));
    println!("tpd-echo: http on {http_port}, tcp+udp echo on {echo_port}");
    thread::spawn(move || accept_loop(echo, echo_conn));
    thread::spawn(move || udp_loop(&udp));
    accept_loop(http, http_conn);
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<(u16, u16), String> {
    let (mut http, mut echo) = (8080, 9000);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--http" => &mut http,
            "--echo" => &mut echo,
            other => return Err(format!("unknown argument {other:?}")),
        };
        let value = args.next().ok_or(format!("{flag} needs a port"))?;
        *slot = value.parse().map_err(|_| format!("{flag}: {value:?} is not a port"))?;
    }
    Ok((http, echo))
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
        thread::spawn(move || serve(conn, peer));
    }
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
    write!(out, "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n", body.len())?;
    out.write_all(body)
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
        assert_eq!(parse_args(args(&[])), Ok((8080, 9000)));
        assert_eq!(parse_args(args(&["--echo", "7", "--http", "80"])), Ok((80, 7)));
    }

    #[test]
    fn bad_arguments_are_explained() {
        assert!(parse_args(args(&["--http"])).unwrap_err().contains("needs a port"));
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
