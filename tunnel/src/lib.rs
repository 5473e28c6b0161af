//! `tpd-tunnel` is the IO that the sidecar and the agent both run for their
//! WireGuard session: one end of the tunnel ([`Endpoint`], on boringtun),
//! the batched UDP socket it may travel over ([`udp`]), and the loops that
//! read and write `tpd-wire`'s frames and messages over any tokio stream
//! ([`io`]). `tpd-wire` keeps the contracts and their pure decoders; this
//! crate moves them.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod endpoint;
pub mod io;
pub mod udp;

pub use endpoint::{Endpoint, Route, StaticKey};
