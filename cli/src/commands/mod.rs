//! One module per subcommand; `dispatch` routes the parsed command line.

mod connect;
mod doctor;
mod env;
mod quit;
mod restore;
mod run;
mod status;
mod version;

use std::process::ExitCode;

use crate::cli::{Cli, Command, GlobalArgs};
use crate::cluster::Cluster;

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Doctor => doctor::run(&cli.global).await,
        Command::Version => version::run(&cli.global).await,
        Command::Compose(args) => crate::compose::cmd::run(&cli.global, args).await,
        Command::Connect(args) => connect::run(&cli.global, args).await,
        Command::Quit(args) => quit::run(&cli.global, &args).await,
        Command::Run(args) => run::run(&cli.global, *args).await,
        Command::Env(args) => env::run(&cli.global, &args).await,
        Command::Status(args) => status::run(&cli.global, &args).await,
        Command::Restore(args) => restore::run(&cli.global, &args).await,
        Command::Guardian(args) => crate::guardian::run(&cli.global, &args).await,
    }
}

/// The cluster a command talks to: connected, its namespace checked, and
/// swaps whose session vanished (a laptop closed mid-session) repaired first.
pub(crate) async fn cluster(global: &GlobalArgs) -> anyhow::Result<Cluster> {
    let cluster = crate::cluster::connect(global).await?;
    crate::checks::namespace_exists(&cluster).await?;
    crate::swap::apply::repair_abandoned(&cluster.client, Some(&cluster.namespace)).await?;
    Ok(cluster)
}
