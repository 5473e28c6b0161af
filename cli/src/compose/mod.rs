//! docker-compose projects on a tpd session: the override generator (pure),
//! the compose tool it drives, and the `tpd compose` command, on top of
//! `crate::session` (the named session's record, the held session).

pub mod cmd;
pub mod generate;
pub mod project;
pub mod tool;
