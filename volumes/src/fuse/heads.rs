//! Serving reads of small files from the content that came with their open.
//!
//! The agent sends a small file's whole content with the answer to an open
//! for reading (`files::OPEN_DATA_MAX`), so `cat` of a config file costs one
//! round trip instead of two. That content is a snapshot, so it is used only
//! while it cannot be staler than what the kernel's attribute cache already
//! allows:
//!
//! - for [`HEAD_TTL`] after the open: a change made in the pod shows within
//!   that lifetime (a change the agent reports drops it sooner);
//! - until anything changes through the mounts: a local `write` that
//!   returned must be seen by every later read, whichever handle it came
//!   through. Every change bumps a generation when it starts and when it
//!   ends, and content is kept only if no change started or ended while its
//!   open was in flight (the agent may have read the file before or after
//!   the change landed). One `Heads` serves every mount of a connection, as
//!   two mounts may show the same volume (subPaths).
//!
//! Pure: time comes in as an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long after its open a small file's content answers its reads.
pub const HEAD_TTL: Duration = Duration::from_secs(1);

/// Most content kept at once: a program holding many small files open must
/// not grow the sidecar without bound; past it, reads go to the agent.
pub const MAX_KEPT: usize = 64 << 20;

#[derive(Debug, Default)]
pub struct Heads {
    generation: u64,
    /// Open handles' whole content, and when their open was sent.
    open: HashMap<u64, (Instant, Bytes)>,
    /// Bytes held in `open`.
    kept: usize,
}

impl Heads {
    /// Take it before sending an open; [`Heads::store`] checks it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Something is changing, or finished changing, through the mount.
    pub fn changed(&mut self) {
        self.generation += 1;
        self.open.clear();
        self.kept = 0;
    }

    /// Keeps the content an open sent at `sent` (time and generation)
    /// returned, unless the mount changed meanwhile.
    pub fn store(&mut self, handle: u64, generation: u64, sent: Instant, data: Bytes) {
        if generation != self.generation {
            return;
        }
        if self.kept + data.len() > MAX_KEPT {
            // Content past its lifetime answers nothing any more.
            self.open.retain(|_, (at, _)| sent.saturating_duration_since(*at) < HEAD_TTL);
            self.kept = self.open.values().map(|(_, d)| d.len()).sum();
            if self.kept + data.len() > MAX_KEPT {
                return;
            }
        }
        self.kept += data.len();
        self.forget(handle);
        self.open.insert(handle, (sent, data));
    }

    /// The answer to a read through `handle`, when its kept content still
    /// answers it; `None` means ask the agent. The content is the whole file,
    /// so a read past its end is answered short, as at end of file.
    pub fn read(&mut self, handle: u64, offset: u64, size: u32, now: Instant) -> Option<Bytes> {
        let (sent, data) = self.open.get(&handle)?;
        if now.saturating_duration_since(*sent) >= HEAD_TTL {
            self.forget(handle);
            return None;
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        Some(data.slice(start..end))
    }

    pub fn release(&mut self, handle: u64) {
        self.forget(handle);
    }

    fn forget(&mut self, handle: u64) {
        if let Some((_, data)) = self.open.remove(&handle) {
            self.kept -= data.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn answers_reads_from_the_content_while_fresh() {
        let mut h = Heads::default();
        let t0 = Instant::now();
        h.store(7, h.generation(), t0, Bytes::from("hello world"));
        assert_eq!(h.read(7, 0, 4096, t0), Some(Bytes::from("hello world")));
        assert_eq!(h.read(7, 6, 3, t0), Some(Bytes::from("wor")));
        assert_eq!(h.read(7, 11, 4096, t0), Some(Bytes::new()), "end of file");
        assert_eq!(h.read(7, u64::MAX, u32::MAX, t0), Some(Bytes::new()));
        assert_eq!(h.read(8, 0, 1, t0), None, "another handle");
        assert_eq!(h.read(7, 0, 1, t0 + HEAD_TTL), None, "older than the attribute lifetime");
        assert_eq!(h.read(7, 0, 1, t0), None, "and forgotten");
    }

    #[test]
    fn changes_through_the_mount_drop_content_and_open_races() {
        let mut h = Heads::default();
        let t0 = Instant::now();
        h.store(1, h.generation(), t0, Bytes::from("a"));
        h.changed();
        assert_eq!(h.read(1, 0, 1, t0), None, "a local write is seen by every handle");
        // An open sent before a change ended answers with what may predate it.
        let sent_at = h.generation();
        h.changed();
        h.store(2, sent_at, t0, Bytes::from("b"));
        assert_eq!(h.read(2, 0, 1, t0), None);
        h.store(3, h.generation(), t0, Bytes::from("c"));
        h.release(3);
        assert_eq!(h.read(3, 0, 1, t0 + Duration::from_millis(1)), None);
    }

    #[test]
    fn keeps_at_most_max_kept_bytes() {
        let mut h = Heads::default();
        let t0 = Instant::now();
        // Clones share one buffer: only the accounting sees 1 MiB each.
        let mib = Bytes::from(vec![1u8; 1 << 20]);
        let n = (MAX_KEPT >> 20) as u64;
        for handle in 0..n {
            h.store(handle, h.generation(), t0, mib.clone());
        }
        h.store(n, h.generation(), t0, mib.clone());
        assert_eq!(h.read(n, 0, 1, t0), None, "over the limit: read from the agent");
        h.release(0);
        h.store(n, h.generation(), t0, mib.clone());
        assert_eq!(h.read(n, 0, 1, t0), Some(Bytes::from(vec![1u8])));
        // Content past its lifetime makes room.
        let later = t0 + HEAD_TTL;
        h.store(n + 1, h.generation(), later, mib.clone());
        assert_eq!(h.read(n + 1, 0, 1, later), Some(Bytes::from(vec![1u8])));
        assert_eq!(h.read(1, 0, 1, t0), None, "dropped to make room");
    }
}
