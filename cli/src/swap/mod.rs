//! Swapping a Deployment for the tpd agent and restoring it. The planning
//! (`plan`, `identity`, `record`, `lease`, `gitops`) is pure and tested in memory;
//! `apply` is the thin kube-rs layer that reads, patches and waits.

pub mod apply;
pub mod gitops;
pub mod identity;
pub mod lease;
pub mod plan;
pub mod record;
