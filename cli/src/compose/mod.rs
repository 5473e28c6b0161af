//! docker-compose projects on a tpd session: the override generator (pure),
//! the compose tool it drives, the session record it reads, and the
//! `tpd compose` command.

pub mod args;
pub mod cmd;
pub mod generate;
pub mod project;
pub mod session;
pub mod tool;
