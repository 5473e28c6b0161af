//! What a connection's first bytes say it is (HTTP/1, HTTP/2's preface,
//! TLS, or anything else), read without losing them: the router decides
//! how to serve a connection from these, then serves it from its start.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How long a connection may stay silent before its first bytes: clients
/// speak first on an HTTP port, but may open a connection well ahead.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest method token looked at; longer is not HTTP/1.
const MAX_METHOD: usize = 32;
/// What a client with prior knowledge of HTTP/2 sends first (RFC 9113 3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A TLS record's first byte when it carries a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// What a connection's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FirstBytes {
    /// A method token and a space: an HTTP/1.x request line.
    Http1,
    /// HTTP/2's whole connection preface.
    Http2,
    /// A TLS handshake record (a type of 22 and a 3.x version).
    Tls,
    /// Anything else.
    Other,
}

/// `None` until the bytes so far decide.
pub(super) fn classify(head: &[u8]) -> Option<FirstBytes> {
    // Only the whole preface is HTTP/2: `PRI` is no HTTP/1 method either.
    let n = head.len().min(H2_PREFACE.len());
    if head[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(FirstBytes::Http2);
    }
    match head {
        [TLS_HANDSHAKE] => return None,
        [TLS_HANDSHAKE, 3, ..] => return Some(FirstBytes::Tls),
        _ => {}
    }
    for (i, &b) in head.iter().enumerate() {
        if b == b' ' {
            let method = &head[..i];
            return Some(match !method.is_empty() && method != b"PRI" {
                true => FirstBytes::Http1,
                false => FirstBytes::Other,
            });
        }
        if !is_tchar(b) || i >= MAX_METHOD {
            return Some(FirstBytes::Other);
        }
    }
    None
}

/// A token character (RFC 9110), of which a method is made.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads until the first bytes decide what the connection is; `None` when
/// it closes before sending anything.
pub(super) async fn first_bytes(sock: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(MAX_METHOD + 1);
    let read = async {
        while classify(&head).is_none() {
            if sock.read_buf(&mut head).await? == 0 {
                break;
            }
        }
        io::Result::Ok(())
    };
    tokio::time::timeout(FIRST_BYTES_TIMEOUT, read).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    Ok((!head.is_empty()).then_some(head))
}

/// A connection whose first bytes were already read: they are read again first.
pub(super) struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(super) fn new(head: Vec<u8>, inner: S) -> Self {
        Prefixed { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let rest = &self.head[self.at..];
        if rest.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http1_http2_and_tls_from_the_rest() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(FirstBytes::Http1));
        assert_eq!(classify(b"PROPFIND "), Some(FirstBytes::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
        assert_eq!(classify(H2_PREFACE), Some(FirstBytes::Http2));
        assert_eq!(classify(&[H2_PREFACE, b"\x00\x00\x12\x04"].concat()), Some(FirstBytes::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None, "HTTP/2 only on the whole preface");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), Some(FirstBytes::Other));
        assert_eq!(classify(b"PRI / HTTP/1.1"), Some(FirstBytes::Other));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(FirstBytes::Tls));
        assert_eq!(classify(b"\x16\x00"), Some(FirstBytes::Other));
        assert_eq!(classify(b" GET"), Some(FirstBytes::Other));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(FirstBytes::Other));
        assert_eq!(classify(&[b'A'; 40]), Some(FirstBytes::Other));
    }
}
