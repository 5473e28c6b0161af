//! Personal intercepts: an agent beside the real container of every pod of
//! a workload routes each HTTP request by the sessions' filters.

pub mod register;
