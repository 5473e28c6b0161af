//! Personal intercepts (`--intercept`): tpd's intercept agent joins every
//! pod of a Deployment beside the real container, the Services that select
//! those pods target the agent's ports, and each agent routes every HTTP
//! request by the sessions' filters: a session's matching requests reach it
//! while the real container serves the rest. The planning (`plan`,
//! `record`) is pure and tested in memory; `apply` is the thin kube-rs
//! layer that reads, patches, waits and renews, and `end` the one that
//! restores, as `crate::swap` is for swaps; `register` keeps the session's routes registered with
//! every agent.

pub mod apply;
pub mod end;
pub mod plan;
pub mod record;
pub mod register;
