//! Fixtures shared by tpd's integration and end-to-end tests: where the built
//! binaries and images are, and guards that remove every container, network
//! and mount a test creates, even when it fails.

// Property tests unwrap inside proptest!, which clippy does not see as a test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod dataplane;
pub mod dns;
pub mod home;
pub mod images;
pub mod intercept;
pub mod interrupt;
pub mod sandbox;
pub mod session;
pub mod volumes;
