//! Async helpers that drive the pure decoders of this crate over any tokio
//! byte stream: reading a hello, preamble, control message or inbound header,
//! and the batching reader and writer of WireGuard frames. The caller owns
//! the sockets; these take `AsyncRead`/`AsyncWrite`. The exceptions are
//! [`dns_exchange`] and [`dns_exchange_tcp`], the one-shot queries both
//! binaries forward DNS with (over TCP when a UDP answer came truncated),
//! and [`shutdown_signal`], how both learn to stop.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use tpd_wire::{control, frame, hello, inbound, preamble};

/// How long a DNS query over UDP waits for its answer before it is sent
/// again, then twice as long each time, within the exchange's timeout (as
/// stub resolvers do): a datagram lost on a lossy link, or inside the
/// tunnel, costs this much instead of the whole timeout. Several RTTs of
/// a far cluster, so a slow answer is seldom asked twice (and a second
/// answer to the same id is never read).
pub const DNS_RESEND_AFTER: Duration = Duration::from_millis(400);

/// Sends one DNS query to `server` over UDP and returns the answer carrying
/// the same id, or a timeout after `timeout`; the query is sent again
/// after [`DNS_RESEND_AFTER`], 2x, 4x... while no answer came.
pub async fn dns_exchange(query: &[u8], server: std::net::SocketAddr, timeout: Duration) -> io::Result<Vec<u8>> {
    let sock = dns_socket(server).await?;
    dns_exchange_on(&sock, query, timeout).await
}

/// A UDP socket on a fresh port, connected to `server`.
pub async fn dns_socket(server: std::net::SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let bind = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    Ok(sock)
}

/// [`dns_exchange`] on a socket already connected to the server.
pub async fn dns_exchange_on(sock: &tokio::net::UdpSocket, query: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wait = DNS_RESEND_AFTER;
    let mut buf = vec![0u8; 4096];
    loop {
        sock.send(query).await?;
        let resend_at = (tokio::time::Instant::now() + wait).min(deadline);
        while let Ok(received) = tokio::time::timeout_at(resend_at, sock.recv(&mut buf)).await {
            let n = received?;
            // Only the answer to this query (same id); a late answer to an
            // earlier one is skipped.
            if n >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
        if resend_at >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        wait *= 2;
    }
}

/// Sends one DNS query to `server` over TCP (RFC 1035 4.2.2: each message
/// behind its 16-bit length) and returns the answer carrying the same id,
/// or a timeout after `timeout` for the whole exchange.
pub async fn dns_exchange_tcp(query: &[u8], server: std::net::SocketAddr, timeout: Duration) -> io::Result<Vec<u8>> {
    let exchange = async {
        let mut sock = tokio::net::TcpStream::connect(server).await?;
        sock.set_nodelay(true)?;
        write_dns_tcp(&mut sock, query).await?;
        loop {
            let answer = read_dns_tcp(&mut sock).await?.ok_or(io::ErrorKind::UnexpectedEof)?;
            if answer.len() >= 2 && query.len() >= 2 && answer[..2] == query[..2] {
                return Ok(answer);
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Reads one length-prefixed DNS message from a TCP stream; `None` when the
/// stream ends before a message begins.
pub async fn read_dns_tcp<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    rd.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Writes one DNS message to a TCP stream behind its length, in one write.
pub async fn write_dns_tcp<W: AsyncWrite + Unpin>(wr: &mut W, msg: &[u8]) -> io::Result<()> {
    let len =
        u16::try_from(msg.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(2 + msg.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    wr.write_all(&framed).await?;
    wr.flush().await
}

/// How long a peer may take to send the first bytes of a stream.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of frames gathered into one write, so a burst of small datagrams
/// costs one syscall.
const WRITE_BATCH: usize = 128 * 1024;

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Reads into `buf` until `decode` yields a value; bytes after it stay in `buf`.
async fn read_until<R, T, E, F>(rd: &mut R, buf: &mut BytesMut, mut decode: F) -> io::Result<T>
where
    R: AsyncRead + Unpin,
    E: std::error::Error + Send + Sync + 'static,
    F: FnMut(&mut BytesMut) -> Result<Option<T>, E>,
{
    loop {
        if let Some(v) = decode(buf).map_err(invalid)? {
            return Ok(v);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Reads the peer's transport hello (bounded by [`HANDSHAKE_TIMEOUT`]).
pub async fn read_hello<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> io::Result<hello::Hello> {
    let read = read_until(rd, buf, |b| {
        let h = hello::Hello::decode(b)?;
        if h.is_some() {
            let _ = b.split_to(hello::LEN);
        }
        Ok::<_, hello::Error>(h)
    });
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Reads and checks the preamble of a stream of `kind`.
pub async fn read_preamble<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    kind: preamble::Kind,
) -> io::Result<()> {
    read_preamble_of(rd, buf, &[kind]).await.map(drop)
}

/// Reads the preamble of a stream that may be of any of `kinds` (a port
/// that serves several) and says which it is.
pub async fn read_preamble_of<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    kinds: &[preamble::Kind],
) -> io::Result<preamble::Kind> {
    let read = read_until(rd, buf, |b| {
        let mut wrong = None;
        for &kind in kinds {
            match preamble::decode(b, kind) {
                Ok(Some(n)) => {
                    let _ = b.split_to(n);
                    return Ok(Some(kind));
                }
                Ok(None) => return Ok(None),
                Err(e @ preamble::Error::WrongKind { .. }) => drop(wrong.get_or_insert(e)),
                Err(e) => return Err(e),
            }
        }
        wrong.map_or(Ok(None), Err)
    });
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Reads the inbound header (bounded by [`HANDSHAKE_TIMEOUT`]).
pub async fn read_inbound_header<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<inbound::Header> {
    // Exactly LEN bytes, so nothing of the client's stream is consumed.
    let mut head = [0u8; inbound::LEN];
    tokio::time::timeout(HANDSHAKE_TIMEOUT, rd.read_exact(&mut head))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    inbound::Header::decode(&head).map_err(invalid)?.ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
}

/// Reads the next JSON message (a [`control::Message`], or another type
/// framed the same way); `Ok(None)` at a clean end of stream.
pub async fn read_message<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> io::Result<Option<T>> {
    match read_until(rd, buf, control::decode).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && buf.is_empty() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes every message from `rx` until it closes.
pub async fn write_messages<W: AsyncWrite + Unpin, T: serde::Serialize>(
    mut wr: W,
    mut rx: mpsc::Receiver<T>,
) -> io::Result<()> {
    let mut out = BytesMut::new();
    while let Some(msg) = rx.recv().await {
        control::encode(&msg, &mut out).map_err(invalid)?;
        wr.write_all(&out).await?;
        out.clear();
    }
    Ok(())
}

/// Calls `on_datagram` for every WireGuard frame read until the stream ends
/// or turns out corrupt (then the error says why and the caller closes it).
pub async fn read_frames<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut buf: BytesMut,
    mut on_datagram: impl FnMut(&[u8]),
) -> io::Result<()> {
    loop {
        while let Some(datagram) = frame::decode(&mut buf).map_err(invalid)? {
            on_datagram(&datagram);
        }
        if buf.capacity() - buf.len() < frame::HEADER_LEN + frame::MAX_PAYLOAD {
            buf.reserve(256 * 1024);
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Writes every datagram from `rx` as a frame, batching what is queued.
/// Small datagrams are copied behind their headers and leave together; a
/// large one leaves from where it is, with the batch before it, in one
/// vectored write: at 64 KiB the copy cost more than the system call.
pub async fn write_frames<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Bytes>) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(WRITE_BATCH + COPY_MAX);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(datagram) = next.take() {
            if datagram.len() < COPY_MAX {
                frame::encode(&datagram, &mut out).map_err(invalid)?;
            } else {
                let head = frame::header(datagram.len()).map_err(invalid)?;
                write_all_vectored(&mut wr, &[&out, &head, &datagram]).await?;
                out.clear();
            }
            if out.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        wr.write_all(&out).await?;
        out.clear();
    }
    Ok(())
}

/// Datagrams smaller than this are copied into [`write_frames`]'s batch.
const COPY_MAX: usize = 16 * 1024;

/// Writes all of `parts`, in order, with as few (vectored) writes as the
/// stream takes.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(wr: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> =
        parts.iter().filter(|p| !p.is_empty()).map(|p| io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = wr.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT: how both containers are told to stop
/// (`docker stop`, the kubelet, Ctrl-C in the foreground). If the handlers
/// cannot be installed it never resolves, and the process ends by SIGKILL.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {

    /// A nameserver that drops the first `drop` datagrams of every query id
    /// and answers the next by echoing it; the datagrams it got.
    async fn lossy_nameserver(drop: usize) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = got.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::HashMap::<[u8; 2], usize>::new();
            let mut buf = vec![0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let times = seen.entry([buf[0], buf[1]]).or_default();
                *times += 1;
                if *times > drop {
                    let _ = udp.send_to(&buf[..n], from).await;
                }
            }
        });
        (addr, got)
    }

    #[tokio::test]
    async fn a_lost_dns_query_is_sent_again_long_before_the_timeout() {
        let (server, got) = lossy_nameserver(1).await;
        let answer = dns_exchange(b"\x12\x34query", server, Duration::from_secs(4)).await.unwrap();
        assert_eq!(answer, b"\x12\x34query");
        // The first one was dropped and never answered: the second got the answer.
        assert_eq!(got.load(std::sync::atomic::Ordering::Relaxed), 2, "sent once more");
        // Every datagram lost: sent at 0, 0.4 and 1.2 s, then a timeout at 1.5 s.
        let (server, got) = lossy_nameserver(usize::MAX).await;
        let started = tokio::time::Instant::now();
        let err = dns_exchange(b"\x56\x78query", server, Duration::from_millis(1500)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(got.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert!(started.elapsed() >= Duration::from_millis(1500), "gave up early: {:?}", started.elapsed());
    }

    use super::*;

    /// A TCP DNS server that first answers with another id (a late answer
    /// to some earlier query), then echoes the query as its answer.
    #[tokio::test]
    async fn a_tcp_exchange_returns_the_answer_with_the_query_id() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let query = read_dns_tcp(&mut sock).await.unwrap().unwrap();
            write_dns_tcp(&mut sock, &[0xff, 0xff, 0x81, 0x80]).await.unwrap();
            write_dns_tcp(&mut sock, &query).await.unwrap();
            assert!(read_dns_tcp(&mut sock).await.unwrap().is_none(), "the client closes after its answer");
        });
        let query = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let answer = dns_exchange_tcp(&query, server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(answer, query);
        served.await.unwrap();
    }

    #[tokio::test]
    async fn a_port_of_several_kinds_says_which_stream_arrived() {
        use tpd_wire::preamble::{self, Kind};
        let kinds = [Kind::Register, Kind::Relay];
        let mut buf = BytesMut::new();
        let mut relay = &[&preamble::encode(Kind::Relay)[..], b"rest"].concat()[..];
        assert_eq!(read_preamble_of(&mut relay, &mut buf, &kinds).await.unwrap(), Kind::Relay);
        assert_eq!(&buf[..], b"rest", "what follows the preamble stays in the buffer");
        let mut control = &preamble::encode(Kind::Control)[..];
        let err = read_preamble_of(&mut control, &mut BytesMut::new(), &kinds).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut http = &b"GET / HTTP/1.1\r\n"[..];
        assert!(read_preamble_of(&mut http, &mut BytesMut::new(), &kinds).await.is_err());
    }

    #[tokio::test]
    async fn frames_cross_a_stream_in_order() {
        let (a, mut b) = tokio::io::duplex(4096);
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_frames(a, rx));
        // Every tenth is large enough to be written from where it is; the
        // small pipe cuts those writes anywhere.
        let size = |n: usize| if n.is_multiple_of(10) { COPY_MAX - 10 + n * 100 } else { n * 7 };
        let sent: Vec<Bytes> = (1..200usize).map(|n| Bytes::from(vec![n as u8; size(n)])).collect();
        let to_send = sent.clone();
        tokio::spawn(async move {
            for d in to_send {
                tx.send(d).await.unwrap();
            }
        });
        let mut got = Vec::new();
        read_frames(&mut b, BytesMut::new(), |d| got.push(Bytes::copy_from_slice(d))).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn corrupt_stream_is_an_error_not_a_panic() {
        let mut rd: &[u8] = &[0, 0, 1, 2, 3];
        let err = read_frames(&mut rd, BytesMut::new(), |_| {}).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
