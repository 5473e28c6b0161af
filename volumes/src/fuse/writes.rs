//! Write-behind: a write is answered as soon as it is on its way to the
//! agent, so one writer keeps several in flight instead of waiting a round
//! trip for each (sshfs does the same by default, NFS until close). Through
//! a port-forward that round trip is most of a write's time.
//!
//! What keeps this correct:
//! - An error the agent reports for a write (ENOSPC, EDQUOT, EIO) is
//!   answered to the handle's next write, to its flush (every close of a
//!   file opened for writing) and to fsync: `close` and `fsync` fail as
//!   they would on NFS.
//! - Every other request of the mount first waits until no write is in
//!   flight ([`WriteBehind::settled`]): nothing reads, lists or stats the
//!   pod's files behind a write the kernel was told is done. The kernel
//!   would otherwise take an older size from the answer and drop the
//!   pages it holds beyond it.
//! - The agent runs the writes of one handle in the order they were sent
//!   (file protocol 3), so appends land in the order written. A write
//!   overlapping one in flight through another handle waits for it: the
//!   agent runs other requests in parallel.
//! - O_SYNC/O_DSYNC writes are not deferred ([`deferrable`]): a program
//!   that asked for synchronous writes gets them.
//! - At most [`WINDOW`] bytes per mount are in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::lock;
use tokio::sync::{OwnedRwLockReadGuard, OwnedSemaphorePermit, RwLock, Semaphore};

/// Bytes of writes per mount that may be in flight, answered but not done.
/// A few round trips' worth at port-forward speeds; bounds the memory
/// writes hold and what an error can leave unwritten behind it.
pub const WINDOW: usize = 8 * 1024 * 1024;

/// Whether writes through a file opened with `flags` may be answered
/// before they are done.
pub fn deferrable(flags: i32) -> bool {
    flags & (libc::O_SYNC | libc::O_DSYNC) == 0
}

/// Deferred writes of one mount.
#[derive(Debug)]
pub struct WriteBehind {
    /// Held shared by each write in flight; taken whole to wait until none
    /// is. tokio's lock queues new writes behind a waiting `settled`, so a
    /// steady writer cannot starve a reader.
    in_flight: Arc<RwLock<()>>,
    window: Arc<Semaphore>,
    ranges: Arc<Mutex<Ranges>>,
    /// The first error of a deferred write, by file handle, until release.
    errors: Mutex<HashMap<u64, i32>>,
}

/// Byte ranges of the writes in flight, by inode.
#[derive(Debug, Default)]
struct Ranges {
    next: u64,
    by_id: HashMap<u64, (u64, std::ops::Range<u64>)>,
}

impl Ranges {
    fn overlaps(&self, ino: u64, range: &std::ops::Range<u64>) -> bool {
        self.by_id.values().any(|(i, r)| *i == ino && r.start < range.end && range.start < r.end)
    }
}

/// One write in flight; dropping it (when the agent answered) lets the
/// requests that wait for it go.
#[derive(Debug)]
pub struct InFlight {
    id: u64,
    ranges: Arc<Mutex<Ranges>>,
    _shared: OwnedRwLockReadGuard<()>,
    _window: OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.ranges).by_id.remove(&self.id);
    }
}

impl Default for WriteBehind {
    fn default() -> Self {
        WriteBehind {
            in_flight: Arc::new(RwLock::new(())),
            window: Arc::new(Semaphore::new(WINDOW)),
            ranges: Arc::default(),
            errors: Mutex::default(),
        }
    }
}

impl WriteBehind {
    /// Waits until every write answered so far is done.
    pub async fn settled(&self) {
        // A write is registered before it is answered, so with none
        // registered there is nothing to wait for; most requests of most
        // mounts meet no write and skip the lock.
        if lock(&self.ranges).by_id.is_empty() {
            return;
        }
        drop(self.in_flight.write().await);
    }

    /// Waits for room for a write of `len` bytes at `offset` of `ino`,
    /// and for any write in flight it overlaps; the write is in flight
    /// until the returned value is dropped.
    pub async fn begin(&self, ino: u64, offset: u64, len: usize) -> InFlight {
        let range = offset..offset.saturating_add(len as u64);
        let permits = u32::try_from(len.clamp(1, WINDOW)).unwrap_or(u32::MAX);
        loop {
            let shared = self.in_flight.clone().read_owned().await;
            // Never closed, so acquiring cannot fail.
            let window = self.window.clone().acquire_many_owned(permits).await.expect("semaphore is never closed");
            if let Some(id) = self.claim(ino, &range) {
                return InFlight { id, ranges: self.ranges.clone(), _shared: shared, _window: window };
            }
            drop((shared, window));
            self.settled().await;
        }
    }

    /// Registers `range` of `ino` as in flight unless it overlaps a write
    /// that is.
    fn claim(&self, ino: u64, range: &std::ops::Range<u64>) -> Option<u64> {
        let mut ranges = lock(&self.ranges);
        if ranges.overlaps(ino, range) {
            return None;
        }
        ranges.next += 1;
        let id = ranges.next;
        ranges.by_id.insert(id, (ino, range.clone()));
        Some(id)
    }

    /// Records what a deferred write through `fh` failed with; the first
    /// error is the one reported.
    pub fn failed(&self, fh: u64, errno: i32) {
        lock(&self.errors).entry(fh).or_insert(errno);
    }

    /// The error a deferred write through `fh` failed with, if any.
    pub fn error(&self, fh: u64) -> Option<i32> {
        lock(&self.errors).get(&fh).copied()
    }

    /// Forgets a released handle.
    pub fn forget(&self, fh: u64) {
        lock(&self.errors).remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tpd_wire::files;

    use super::*;

    #[tokio::test]
    async fn settled_waits_for_every_write_in_flight() {
        let wb = WriteBehind::default();
        let a = wb.begin(2, 0, 10).await;
        let b = wb.begin(2, 10, 10).await;
        let settled = tokio::time::timeout(Duration::from_millis(50), wb.settled());
        assert!(settled.await.is_err(), "settled while two writes were in flight");
        drop(a);
        assert!(tokio::time::timeout(Duration::from_millis(50), wb.settled()).await.is_err());
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), wb.settled()).await.expect("settled once both were done");
    }

    #[tokio::test]
    async fn an_overlapping_write_waits_for_the_one_in_flight() {
        let wb = Arc::new(WriteBehind::default());
        let first = wb.begin(2, 0, 100).await;
        // Another inode, or the next bytes of this one, go at once.
        let other = tokio::time::timeout(Duration::from_secs(5), wb.begin(3, 0, 100)).await.expect("other inode");
        let next = tokio::time::timeout(Duration::from_secs(5), wb.begin(2, 100, 100)).await.expect("adjacent");
        let again = tokio::spawn({
            let wb = wb.clone();
            async move { wb.begin(2, 50, 10).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!again.is_finished(), "an overlapping write went while the first was in flight");
        drop((first, other, next));
        tokio::time::timeout(Duration::from_secs(5), again).await.expect("went after").expect("task");
    }

    #[tokio::test]
    async fn the_window_bounds_bytes_in_flight() {
        let wb = Arc::new(WriteBehind::default());
        let mut held = Vec::new();
        for i in 0..(WINDOW as u64 / files::MAX_IO as u64) {
            held.push(wb.begin(2, i * u64::from(files::MAX_IO), files::MAX_IO as usize).await);
        }
        let more = tokio::spawn({
            let wb = wb.clone();
            async move { wb.begin(2, WINDOW as u64, 1).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!more.is_finished(), "a write went beyond the window");
        held.pop();
        tokio::time::timeout(Duration::from_secs(5), more).await.expect("went once room was made").expect("task");
    }

    #[test]
    fn the_first_error_is_kept_until_release() {
        let wb = WriteBehind::default();
        assert_eq!(wb.error(7), None);
        wb.failed(7, libc::ENOSPC);
        wb.failed(7, libc::EIO);
        assert_eq!(wb.error(7), Some(libc::ENOSPC));
        assert_eq!(wb.error(8), None);
        wb.forget(7);
        assert_eq!(wb.error(7), None);
    }

    #[test]
    fn synchronous_writes_are_not_deferred() {
        assert!(deferrable(libc::O_WRONLY));
        assert!(deferrable(libc::O_RDWR | libc::O_CREAT));
        assert!(deferrable(libc::O_WRONLY | libc::O_APPEND));
        assert!(!deferrable(libc::O_WRONLY | libc::O_SYNC));
        assert!(!deferrable(libc::O_WRONLY | libc::O_DSYNC));
    }
}
