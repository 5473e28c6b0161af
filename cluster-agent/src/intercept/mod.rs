//! Personal intercepts (`tpd_wire::intercept`): with `TPD_AGENT_INTERCEPT`
//! the agent runs beside the app container in every pod of the workload.
//! Sessions register routes on its intercept port ([`port`], [`registry`]);
//! a router on each of its listening ports ([`router`]) sends the requests
//! that match a live session's route to that session's developer app
//! ([`reach`]: through the session's tunnel on this agent, or relayed to
//! the agent that holds it) and everything else to the real container,
//! copying on the way what mirroring sessions ask for ([`mirror`]).

pub mod mirror;
pub mod port;
pub mod reach;
pub mod registry;
pub mod router;
#[cfg(test)]
mod testing;
