//! A stop asked for by whoever drives the fixtures: `cargo xtask bench`
//! sets it on Ctrl-C, and every polling wait here then fails at its next
//! pause instead of running on to its timeout, so the labs' guards clean
//! up at once. Tests never set it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks every wait to stop; returns whether a stop had been asked for already.
pub fn request() -> bool {
    REQUESTED.swap(true, Ordering::SeqCst)
}

/// Fails once a stop was asked for.
pub fn go_on() -> Result<()> {
    ensure!(!REQUESTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// Sleeps between two polls of a wait, failing if a stop was asked for.
pub fn pause(d: Duration) -> Result<()> {
    go_on()?;
    std::thread::sleep(d);
    go_on()
}
