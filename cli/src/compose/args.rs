//! The command line of `tpd compose`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        tpd compose --swap deployment/api --service api -- up            # its own session, ended with compose\n  \
        tpd compose --session dev --swap deployment/api --service api -- up   # a `tpd connect --name dev` session\n  \
        tpd compose generate --session dev --outbound worker > docker-compose.tpd.yml"
)]
pub struct ComposeArgs {
    #[command(subcommand)]
    pub action: Option<ComposeAction>,
    #[command(flatten)]
    pub choice: Choice,
    /// `up` and its arguments, passed on to compose.
    #[arg(last = true, value_name = "up ARGS")]
    pub compose_args: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ComposeAction {
    /// Print the override file only, for `docker compose -f ... -f docker-compose.tpd.yml up`.
    Generate(Choice),
}

/// Which compose files, which session, and which services join it.
#[derive(Debug, Clone, Args)]
pub struct Choice {
    /// A compose file, as `docker compose -f` (default: compose's own files in this directory).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// A Deployment the session swaps; the N-th --service replaces it.
    #[arg(long, value_name = "deployment/NAME")]
    pub swap: Vec<String>,
    /// The compose service that replaces the N-th --swap.
    #[arg(long, value_name = "SVC")]
    pub service: Vec<String>,
    /// A service that only needs outbound access to the cluster.
    #[arg(long, value_name = "SVC")]
    pub outbound: Vec<String>,
    /// The session started by `tpd connect --name NAME`. Without it, `up`
    /// starts a session of its own and ends it with compose; `generate`
    /// uses `tpd connect`'s default name (CONTEXT-NAMESPACE).
    #[arg(long, value_name = "NAME")]
    pub session: Option<String>,
    /// For `up`'s own session: cluster traffic to the swapped container's REMOTE port goes to LOCAL.
    #[arg(long = "port", value_name = "REMOTE:LOCAL", requires = "swap", conflicts_with = "session")]
    pub ports: Vec<crate::cli::PortMapping>,
    /// For `up`'s own session: also reach this port of the pod's loopback on 127.0.0.1 (N or N/udp).
    #[arg(long = "pod-port", value_name = "N[/udp]", conflicts_with = "session")]
    pub pod_ports: Vec<tpd_wire::neighbours::PodPort>,
}

impl Choice {
    /// `(deployment/NAME, service)` pairs, in the order given.
    pub fn pairs(&self) -> Result<Vec<(String, String)>, crate::error::Hint> {
        if self.swap.len() != self.service.len() {
            return Err(crate::error::Hint::new(
                format!("{} --swap but {} --service", self.swap.len(), self.service.len()),
                "give each --swap deployment/NAME the compose service that replaces it: --swap deployment/api --service api",
            ));
        }
        Ok(self.swap.iter().cloned().zip(self.service.iter().cloned()).collect())
    }
}
