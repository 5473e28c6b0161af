//! The volume bridge: the swapped pod's volumes, served by the agent and
//! FUSE-mounted by the sidecar. This crate holds both ends of the file
//! protocol, whose messages and framing are `tpd_wire::files`:
//!
//! - [`server`], the agent's file service: serves the swapped container's
//!   volume mounts inside the tunnel, confined to each mount and with the
//!   agent's own identity, so files are read and written as the real app
//!   would;
//! - [`fuse`], the sidecar's FUSE client: mounts each volume, caches what
//!   the protocol lets it cache, and unmounts on every exit path.
//!
//! `tpd-agent` runs the server and `tpd-sidecar` the client; neither
//! depends on the other. Keeping both ends in one crate lets the client's
//! tests mount real FUSE file systems over the real server in one process
//! (`fuse/tests.rs`), and gives the e2e tests and the volumes benchmark both
//! ends as they ship. Where the mounts appear on the host and in the
//! developer's container is the CLI's `mounts` plan; docs/volumes.md
//! describes the whole bridge.

mod frames;
pub mod fuse;
pub mod server;
