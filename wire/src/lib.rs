//! `tpd-wire` owns every contract that two tpd processes must agree on:
//! the names of env vars, labels, annotations and ports ([`names`]), the
//! tunnel's addressing, and the framing and message types that travel
//! between the CLI, the sidecar and the agent.
//!
//! Like `kube-core`, it holds types and pure encode/decode functions only and
//! performs no IO, so every decoder can be unit-, property- and fuzz-tested in
//! memory. The binaries depend on it, never on each other.

// Property tests unwrap inside proptest!, which clippy does not see as a test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod control;
pub mod dns;
pub mod files;
pub mod frame;
pub mod hello;
pub mod inbound;
pub mod intercept;
pub mod ip;
pub mod names;
pub mod neighbours;
pub mod preamble;
pub mod sidecar;

/// The version of tpd that built this crate; every binary reports it and the
/// images are tagged with it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
