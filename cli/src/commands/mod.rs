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

use crate::cli::{Cli, Command};

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Doctor => doctor::run(&cli.global).await,
        Command::Version => version::run(&cli.global).await,
        Command::Compose(args) => crate::compose::cmd::run(&cli.global, *args).await,
        Command::Connect(args) => connect::run(&cli.global, *args).await,
        Command::Quit(args) => quit::run(&cli.global, &args).await,
        Command::Run(args) => run::run(&cli.global, *args).await,
        Command::Env(args) => env::run(&cli.global, &args).await,
        Command::Status(args) => status::run(&cli.global, &args).await,
        Command::Restore(args) => restore::run(&cli.global, &args).await,
        Command::Guardian(args) => crate::guardian::run(&cli.global, &args).await,
    }
}
