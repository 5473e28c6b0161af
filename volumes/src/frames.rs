//! Writing the file protocol's frames to a stream, as both ends do: a burst
//! of requests or answers leaves in one system call, and a large read's or
//! write's data leaves from where it is, without a copy.

use bytes::{BufMut, BytesMut};
use tpd_wire::files::{MAX_FRAME, Message, encode_head};

/// Payloads smaller than this are copied into the frame buffer: one write
/// for many small frames costs less than a write each.
const COPY_MAX: usize = 64 * 1024;

/// Appends the frame of `msg` under `id` to `out`; a large payload is not
/// copied but written to `wr` right behind what `out` holds, in one
/// vectored write that empties `out`.
async fn put_frame<M, W>(wr: &mut W, out: &mut BytesMut, id: u64, msg: &M) -> std::io::Result<()>
where
    M: Message,
    W: tokio::io::AsyncWrite + Unpin,
{
    match encode_head(id, msg, out) {
        Some(payload) if payload.len() >= COPY_MAX => {
            tpd_tunnel::io::write_all_vectored(wr, &[out, payload]).await?;
            out.clear();
            Ok(())
        }
        Some(payload) => {
            out.put_slice(payload);
            Ok(())
        }
        None => Ok(()),
    }
}

/// Writes the frame of `first`, then of whatever `more` has ready while the
/// batch is under [`MAX_FRAME`], in as few writes as the frames allow: small
/// frames are copied into `out` and leave together, a large payload leaves
/// from where it is; `out` is empty again afterwards. Both ends' writers use
/// it: a burst of answers or requests leaves in one system call.
pub async fn write_batch<M, W>(
    wr: &mut W,
    out: &mut BytesMut,
    first: (u64, M),
    mut more: impl FnMut() -> Option<(u64, M)>,
) -> std::io::Result<()>
where
    M: Message,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut next = Some(first);
    while let Some((id, msg)) = next.take() {
        put_frame(wr, out, id, &msg).await?;
        if out.len() < MAX_FRAME {
            next = more();
        }
    }
    tokio::io::AsyncWriteExt::write_all(wr, out).await?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tpd_wire::files::{MAX_IO, Response, decode};

    #[tokio::test]
    async fn frames_with_large_payloads_arrive_whole_and_in_order() {
        let sent: Vec<Response> = [0usize, 10, COPY_MAX - 1, COPY_MAX, MAX_IO as usize]
            .iter()
            .flat_map(|&n| [Response::Data(Bytes::from(vec![n as u8; n])), Response::Written(n as u32)])
            .collect();
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            let mut out = BytesMut::new();
            let mut frames = to_send.into_iter().enumerate().map(|(id, r)| (id as u64, r));
            let first = frames.next().expect("something to send");
            write_batch(&mut a, &mut out, first, || frames.next()).await
        });
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        while got.len() < sent.len() {
            match decode::<Response>(&mut buf).expect("well-formed") {
                Some((id, r)) => got.push((id, r)),
                None => assert_ne!(b.read_buf(&mut buf).await.expect("read"), 0, "stream ended early"),
            }
        }
        writer.await.expect("writer").expect("written");
        let want: Vec<(u64, Response)> = sent.into_iter().enumerate().map(|(i, r)| (i as u64, r)).collect();
        assert_eq!(got, want);
    }
}
