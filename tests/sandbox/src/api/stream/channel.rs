//! Framing of the Kubernetes websocket channel protocols
//! (`v4.channel.k8s.io`, `v5.channel.k8s.io`): every binary message starts
//! with a channel byte; v5 adds a close message `[255, channel]`.

/// exec: stdin, stdout, stderr, error (a Status), resize (JSON size).
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
/// v5: the peer closed its writing side of a channel.
pub const CLOSE: u8 = 255;

pub const V4: &str = "v4.channel.k8s.io";
pub const V5: &str = "v5.channel.k8s.io";

/// Clients read a stream to its end only on a normal (1000) close; a bare
/// close (1005) is an error to them.
pub fn normal_close() -> axum::extract::ws::Message {
    axum::extract::ws::Message::Close(Some(axum::extract::ws::CloseFrame { code: 1000, reason: "".into() }))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Data {
        channel: u8,
        data: &'a [u8],
    },
    /// The client will send no more on `channel` (v5 only).
    Close {
        channel: u8,
    },
}

/// Decodes one binary websocket message; `None` for an empty one.
pub fn decode(msg: &[u8], v5: bool) -> Option<Frame<'_>> {
    let (&channel, data) = msg.split_first()?;
    if v5 && channel == CLOSE {
        return data.first().map(|&channel| Frame::Close { channel });
    }
    Some(Frame::Data { channel, data })
}

pub fn encode(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out
}

/// A terminal size from the resize channel (`{"Width":80,"Height":24}`).
pub fn decode_resize(data: &[u8]) -> Option<(u16, u16)> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    serde_json::from_slice::<Size>(data).ok().map(|s| (s.width, s.height))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames() {
        assert_eq!(decode(&[1, b'h', b'i'], false), Some(Frame::Data { channel: 1, data: b"hi" }));
        assert_eq!(decode(&[255, 0], true), Some(Frame::Close { channel: 0 }));
        assert_eq!(decode(&[255, 0], false), Some(Frame::Data { channel: 255, data: &[0] }));
        assert_eq!(decode(&[], true), None);
        assert_eq!(decode(&[255], true), None);
        assert_eq!(encode(2, b"x"), vec![2, b'x']);
        assert_eq!(decode_resize(br#"{"Width":80,"Height":24}"#), Some((80, 24)));
        assert_eq!(decode_resize(b"nope"), None);
    }

    proptest! {
        #[test]
        fn decoding_never_panics(msg in prop::collection::vec(any::<u8>(), 0..64), v5 in any::<bool>()) {
            let _ = decode(&msg, v5);
            let _ = decode_resize(&msg);
        }
    }
}
