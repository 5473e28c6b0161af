//! The session's [`Spec`]: what a session is asked to be, built from the
//! arguments of `tpd run`, `tpd connect` or `tpd compose`, and the one
//! thing the session machinery reads of them. It crosses to `tpd connect`'s
//! background process as JSON.

use serde::{Deserialize, Serialize};

use crate::cli::{ConnectArgs, RunArgs, SessionArgs};
use crate::error::Hint;
use crate::swap::plan::Target;

/// What a session is asked to be, whoever starts it (`tpd run`, `tpd
/// connect`, `tpd compose up`); the developer's container, which only
/// `tpd run` has, is not part of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub swap: Option<Target>,
    #[serde(flatten)]
    pub session: SessionArgs,
    /// Where the volumes also appear in the developer's container.
    pub mount_root: Option<String>,
    /// Seconds a volume request waits for a lost agent.
    pub volume_timeout: Option<u64>,
}

impl Spec {
    /// At most one swap: one sidecar holds one WireGuard session to one agent.
    pub fn new(swaps: &[Target]) -> Result<Self, Hint> {
        if let [first, second, ..] = swaps {
            return Err(Hint::new(
                format!("a session swaps one Deployment, and {first} and {second} were given"),
                "start one session per Deployment (`tpd connect --name NAME --swap ...` for each)",
            ));
        }
        let session = SessionArgs { ready_timeout: 120, ..SessionArgs::default() };
        Ok(Spec { swap: swaps.first().cloned(), session, ..Default::default() })
    }

    /// `tpd connect`'s session.
    pub fn from_connect(args: &ConnectArgs) -> Result<Self, Hint> {
        Ok(Spec { session: args.session.clone(), ..Spec::new(&args.swap)? })
    }

    /// `tpd run`'s session.
    pub fn from_run(args: &RunArgs) -> Self {
        Spec {
            swap: args.swap.clone(),
            session: args.session.clone(),
            mount_root: args.mount_root.clone(),
            volume_timeout: args.volume_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Transport;

    #[test]
    fn a_spec_crosses_to_the_holder_unchanged() {
        let spec = Spec {
            swap: Some("deployment/api:app".parse().unwrap()),
            session: SessionArgs {
                force: true,
                ports: vec!["8080:9000".parse().unwrap()],
                pod_ports: vec!["6379".parse().unwrap(), "8125/udp".parse().unwrap()],
                publish: vec!["18080:9000".parse().unwrap()],
                also_proxy: vec!["10.0.0.0/8".parse().unwrap()],
                transport: Transport::Auto,
                no_mounts: true,
                ready_timeout: 7,
            },
            mount_root: Some("/remote".into()),
            volume_timeout: Some(5),
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<Spec>(&json).unwrap(), spec);
    }

    #[test]
    fn one_swap_per_session() {
        let t = |s: &str| s.parse::<Target>().unwrap();
        assert!(Spec::new(&[]).unwrap().swap.is_none());
        assert_eq!(Spec::new(&[t("deployment/a")]).unwrap().swap, Some(t("deployment/a")));
        let err = Spec::new(&[t("deployment/a"), t("deployment/b")]).unwrap_err();
        assert!(err.message.contains("deployment/a and deployment/b"), "{}", err.message);
    }

    /// The shared flags parse the same under both commands, and --port
    /// without a swap is refused by both (it used to be ignored by `run`).
    #[test]
    fn run_and_connect_share_the_session_flags() {
        use clap::Parser as _;
        let flags = ["--swap", "deployment/api", "--port", "8080:9000", "--pod-port", "6379", "-p", "18080:9000"];
        let parse = |cmd: &[&str]| crate::cli::Cli::try_parse_from(["tpd"].iter().chain(cmd).chain(&flags));
        let run = match parse(&["run", "--image", "app"]).unwrap().command {
            crate::cli::Command::Run(args) => Spec::from_run(&args),
            other => panic!("{other:?}"),
        };
        let connect = match parse(&["connect"]).unwrap().command {
            crate::cli::Command::Connect(args) => Spec::from_connect(&args).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(run.session, connect.session);
        assert_eq!(run.session.ready_timeout, 120);
        for cmd in [&["run", "--image", "app", "--port", "1:2"][..], &["connect", "--port", "1:2"]] {
            let err = crate::cli::Cli::try_parse_from(["tpd"].iter().chain(cmd)).unwrap_err();
            assert!(err.to_string().contains("--swap"), "{cmd:?}: {err}");
        }
    }
}
