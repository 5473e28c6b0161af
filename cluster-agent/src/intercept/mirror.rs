//! Mirroring: the real container answers a request as if nothing were
//! there, and each session whose mirroring route matches it gets a copy,
//! whose answer is thrown away. A copy never slows or fails the request it
//! copies: the body is copied as it streams past ([`Tee`], up to the
//! largest body limit of the sessions, the rest cut and the copy marked),
//! and the copy is queued when the request body is done (read on to the
//! limit when the upstream answered without reading it); a session whose
//! queue is full (its app slow or gone) loses the copy, which is counted.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Request, http};
use tpd_wire::intercept::{MIRROR_HEADER, MIRROR_TRUNCATED_HEADER, Mirror};

use super::registry::Target;

/// Copies waiting for one session on one port; past it they are dropped.
/// Room for a burst: an app behind a tunnel answers slower than the pod's.
pub const QUEUE: usize = 256;
/// Bytes of copied bodies waiting on one port, all sessions together; past
/// it copies are dropped (the memory a burst of large bodies may take).
pub const QUEUED_BYTES: usize = 16 << 20;
/// Copies of one session on one port in flight at once.
pub const IN_FLIGHT: usize = 8;
/// How long a session's app may take to answer a copy before it counts as dropped.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long a session's copier waits for a copy before it ends.
pub const IDLE: Duration = Duration::from_secs(60);

/// A copy of one request for one session.
pub struct Duplicate {
    pub target: Target,
    pub request: Request<Bytes>,
}

/// The head of the request being copied and the sessions that get it.
pub struct Copies {
    head: http::request::Parts,
    to: Vec<(Target, Mirror)>,
}

impl Copies {
    /// The copies of a request with `head` for `to`, once its body is known.
    /// Hop-by-hop and length headers are left out: the copy's body may be
    /// shorter, and its framing is its own.
    pub fn new(head: &http::request::Parts, to: Vec<(Target, Mirror)>) -> Self {
        let mut req = Request::new(());
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers.clone();
        for name in [header::CONTENT_LENGTH, header::TRANSFER_ENCODING, header::EXPECT, header::CONNECTION] {
            req.headers_mut().remove(name);
        }
        req.headers_mut().insert(MIRROR_HEADER, HeaderValue::from_static("1"));
        Copies { head: req.into_parts().0, to }
    }

    /// The most of a body any of the sessions wants.
    pub fn body_limit(&self) -> usize {
        let most = self.to.iter().map(|(_, m)| m.body_limit).max().unwrap_or(0);
        usize::try_from(most).unwrap_or(usize::MAX)
    }

    /// One copy per session, of `body` (cut where the session's limit says,
    /// or already cut when `truncated`).
    pub fn made(self, body: &Bytes, truncated: bool) -> Vec<Duplicate> {
        let Copies { head, to } = self;
        to.into_iter()
            .map(|(target, mirror)| {
                let limit = usize::try_from(mirror.body_limit).unwrap_or(usize::MAX);
                let cut = truncated || body.len() > limit;
                let mut request = Request::from_parts(head.clone(), body.slice(..body.len().min(limit)));
                if cut {
                    request.headers_mut().insert(MIRROR_TRUNCATED_HEADER, HeaderValue::from(mirror.body_limit));
                }
                Duplicate { target, request }
            })
            .collect()
    }
}

/// A request body on its way to the real container that keeps its first
/// `limit` bytes. When dropped (sent, or left unread by an upstream that
/// answered without it) it hands what it kept to `done`.
pub struct Tee<F: FnOnce(Kept)> {
    kept: Option<Kept>,
    done: Option<F>,
}

/// What a [`Tee`] kept of a body, and the rest of the body when the
/// upstream did not read it all.
pub struct Kept {
    body: BytesMut,
    limit: usize,
    cut: bool,
    ended: bool,
    inner: Incoming,
}

impl Kept {
    fn keep(&mut self, data: &Bytes) {
        let room = self.limit - self.body.len();
        self.cut |= data.len() > room;
        self.body.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Whether the body is known as far as the limit.
    pub fn is_done(&self) -> bool {
        self.cut || self.ended || self.inner.is_end_stream()
    }

    /// The body kept, and whether it was cut at the limit.
    pub fn into_parts(self) -> (Bytes, bool) {
        (self.body.freeze(), self.cut)
    }

    /// The body as far as the limit, and whether it was cut there: what
    /// the upstream left unread is read on (bounded by [`ANSWER_WITHIN`]).
    pub async fn finish(mut self) -> (Bytes, bool) {
        let read = async {
            while !self.is_done() {
                match self.inner.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            self.keep(data);
                        }
                    }
                    Some(Err(_)) => self.cut = true,
                    None => self.ended = true,
                }
            }
        };
        if tokio::time::timeout(ANSWER_WITHIN, read).await.is_err() {
            self.cut = true;
        }
        self.into_parts()
    }
}

impl<F: FnOnce(Kept)> Tee<F> {
    pub fn new(inner: Incoming, limit: usize, done: F) -> Self {
        let kept = Kept { body: BytesMut::new(), limit, cut: false, ended: false, inner };
        Tee { kept: Some(kept), done: Some(done) }
    }

    fn kept(&mut self) -> &mut Kept {
        // Taken only in `drop`.
        self.kept.as_mut().expect("a tee keeps its body until dropped")
    }
}

impl<F: FnOnce(Kept) + Unpin> HttpBody for Tee<F> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let kept = self.kept();
        let polled = Pin::new(&mut kept.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    kept.keep(data);
                }
            }
            Poll::Ready(None) => kept.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.kept.as_ref().is_none_or(|k| k.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.kept.as_ref().map(|k| k.inner.size_hint()).unwrap_or_default()
    }
}

impl<F: FnOnce(Kept)> Drop for Tee<F> {
    fn drop(&mut self) {
        if let (Some(kept), Some(done)) = (self.kept.take(), self.done.take()) {
            done(kept);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(session: &str) -> Target {
        Target {
            session: session.into(),
            token: "t".into(),
            holder: format!("{session}@laptop"),
            home: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn each_session_gets_its_own_cut_and_no_stale_framing() {
        let (head, ()) = Request::post("/upload?x=1")
            .header(header::HOST, "api")
            .header(header::CONTENT_LENGTH, "10")
            .header(header::CONNECTION, "keep-alive")
            .header("x-dev", "alice")
            .body(())
            .unwrap()
            .into_parts();
        let to = vec![(target("small"), Mirror { body_limit: 4 }), (target("big"), Mirror { body_limit: 100 })];
        let copies = Copies::new(&head, to);
        assert_eq!(copies.body_limit(), 100);
        let made = copies.made(&Bytes::from_static(b"0123456789"), false);
        let (small, big) = (&made[0].request, &made[1].request);
        assert_eq!((made[0].target.session.as_str(), small.body().as_ref()), ("small", &b"0123"[..]));
        assert_eq!(small.headers()[MIRROR_TRUNCATED_HEADER], "4");
        assert_eq!(big.body().as_ref(), b"0123456789");
        assert!(!big.headers().contains_key(MIRROR_TRUNCATED_HEADER));
        for copy in [small, big] {
            assert_eq!(copy.uri(), "/upload?x=1");
            assert_eq!(
                (copy.headers()["x-dev"].as_bytes(), copy.headers()[MIRROR_HEADER].as_bytes()),
                (&b"alice"[..], &b"1"[..])
            );
            assert!(!copy.headers().contains_key(header::CONTENT_LENGTH));
            assert!(!copy.headers().contains_key(header::CONNECTION));
        }
        // A body the tee already cut is marked for everyone.
        let made = Copies::new(&head, vec![(target("big"), Mirror { body_limit: 100 })]).made(&Bytes::new(), true);
        assert_eq!(made[0].request.headers()[MIRROR_TRUNCATED_HEADER], "100");
    }
}
