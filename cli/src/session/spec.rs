//! The session's [`Spec`]: what a session is asked to be, built from the
//! arguments of `tpd run`, `tpd connect` or `tpd compose`, and the one
//! thing the session machinery reads of them. It crosses to `tpd connect`'s
//! background process as JSON.

use serde::{Deserialize, Serialize};

use tpd_wire::intercept::{Filter, Mirror};

use crate::cli::{ConnectArgs, FilterArgs, RunArgs, SessionArgs, Transport};
use crate::error::Hint;
use crate::swap::plan::Target;

/// What a session is asked to be, whoever starts it (`tpd run`, `tpd
/// connect`, `tpd compose up`); the developer's container, which only
/// `tpd run` has, is not part of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub swap: Option<Target>,
    #[serde(default)]
    pub intercept: Option<InterceptSpec>,
    #[serde(flatten)]
    pub session: SessionArgs,
    /// Where the volumes also appear in the developer's container.
    pub mount_root: Option<String>,
    /// Seconds a volume request waits for a lost agent.
    pub volume_timeout: Option<u64>,
}

/// `--intercept` and its filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterceptSpec {
    pub target: Target,
    pub filter: Filter,
    /// `--mirror`: copies of the requests, not the requests.
    #[serde(default)]
    pub mirror: Option<Mirror>,
}

impl InterceptSpec {
    /// What the session takes, as the user asked for it.
    pub fn describe(&self) -> String {
        tpd_wire::intercept::describe(&self.filter, self.mirror)
    }
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
        Spec { session: args.session.clone(), ..Spec::new(&args.swap)? }
            .intercepting(args.intercept.as_ref(), &args.filter)
    }

    /// `tpd run`'s session.
    pub fn from_run(args: &RunArgs) -> Result<Self, Hint> {
        let spec = Spec {
            swap: args.swap.clone(),
            intercept: None,
            session: args.session.clone(),
            mount_root: args.mount_root.clone(),
            volume_timeout: args.volume_timeout,
        };
        spec.intercepting(args.intercept.as_ref(), &args.filter)
    }

    /// The Deployment the session swaps or intercepts.
    pub fn deployment(&self) -> Option<&Target> {
        self.swap.as_ref().or(self.intercept.as_ref().map(|i| &i.target))
    }

    /// The spec with `--intercept` and its filter, once the flags make sense
    /// together (checked before anything changes anywhere).
    pub fn intercepting(mut self, target: Option<&Target>, filter: &FilterArgs) -> Result<Self, Hint> {
        let (mirror, filter) = (filter.mirror(), filter.filter());
        let ports = !self.session.ports.is_empty();
        let refusal = match (&self.swap, target) {
            (Some(swap), Some(intercept)) => Some(Hint::new(
                format!("--swap {swap} and --intercept {intercept} were both given"),
                "a session takes all of a Deployment's traffic (--swap) or the requests that match a filter \
                 (--intercept with --header/--baggage/--path-prefix): drop one",
            )),
            (_, None) if !filter.is_empty() || mirror.is_some() => Some(Hint::new(
                "--header, --baggage, --path-prefix and --mirror choose the requests of an --intercept, and none was given",
                "add --intercept deployment/NAME",
            )),
            (None, None) if ports => Some(Hint::new(
                "--port says where a Deployment's traffic arrives, and neither --swap nor --intercept was given",
                "add --swap deployment/NAME (all its traffic) or --intercept deployment/NAME with a filter",
            )),
            (None, Some(t)) if filter.is_empty() && mirror.is_none() => Some(Hint::new(
                format!("--intercept {t} needs a filter: which of its requests come to you"),
                format!(
                    "add --header NAME=VALUE, --baggage KEY=VALUE or --path-prefix /PATH; for copies of every request \
                     add --mirror; for all of its traffic use --swap {t}"
                ),
            )),
            (None, Some(t)) if !ports => Some(Hint::new(
                format!("--intercept {t} needs --port REMOTE:LOCAL: the container's port whose requests you take"),
                "e.g. --port 8080:8080 (REMOTE is a port the container declares, LOCAL where your app listens)",
            )),
            (None, Some(_)) if self.session.transport == Transport::Udp => Some(Hint::new(
                "--transport udp cannot carry an intercept: its requests ride the port-forward",
                "drop --transport (the port-forward is the default)",
            )),
            _ => None,
        };
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        if let Some(target) = target {
            // `auto` means the port-forward for an intercept.
            self.session.transport = Transport::Portforward;
            self.intercept = Some(InterceptSpec { target: target.clone(), filter, mirror });
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_crosses_to_the_holder_unchanged() {
        let spec = Spec {
            swap: Some("deployment/api:app".parse().unwrap()),
            intercept: Some(InterceptSpec {
                target: "deployment/web".parse().unwrap(),
                filter: Filter {
                    headers: [("x-dev".into(), "alice".into())].into(),
                    path_prefix: Some("/api".into()),
                    ..Filter::default()
                },
                mirror: Some(Mirror { body_limit: 4096 }),
            }),
            session: SessionArgs {
                force: true,
                ports: vec!["8080:9000".parse().unwrap()],
                pod_ports: vec!["6379".parse().unwrap(), "8125/udp".parse().unwrap()],
                publish: vec!["18080:9000".parse().unwrap()],
                also_proxy: vec!["10.0.0.0/8".parse().unwrap()],
                transport: Transport::Auto,
                no_mounts: true,
                volume_cache: crate::cli::VolumeCache::Off,
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
    /// without a swap or an intercept is refused by both (it used to be
    /// ignored by `run`).
    #[test]
    fn run_and_connect_share_the_session_flags() {
        use clap::Parser as _;
        let flags = [
            "--swap",
            "deployment/api",
            "--port",
            "8080:9000",
            "--pod-port",
            "6379",
            "-p",
            "18080:9000",
            "--volume-cache=off",
        ];
        let parse = |cmd: &[&str]| crate::cli::Cli::try_parse_from(["tpd"].iter().chain(cmd).chain(&flags));
        let run = match parse(&["run", "--image", "app"]).unwrap().command {
            crate::cli::Command::Run(args) => Spec::from_run(&args).unwrap(),
            other => panic!("{other:?}"),
        };
        let connect = match parse(&["connect"]).unwrap().command {
            crate::cli::Command::Connect(args) => Spec::from_connect(&args).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(run.session, connect.session);
        assert_eq!(run.session.ready_timeout, 120);
        assert_eq!(run.session.volume_cache, crate::cli::VolumeCache::Off);
        for cmd in [&["run", "--image", "app", "--port", "1:2"][..], &["connect", "--port", "1:2"]] {
            let err = spec_of(cmd).unwrap_err();
            assert!(err.message.contains("neither --swap nor --intercept"), "{cmd:?}: {}", err.message);
        }
    }

    /// The spec of `tpd ARGS`, for `run` and `connect`.
    fn spec_of(cmd: &[&str]) -> Result<Spec, Hint> {
        use clap::Parser as _;
        match crate::cli::Cli::try_parse_from(["tpd"].iter().chain(cmd))
            .map_err(|e| Hint::new(e.to_string(), ""))?
            .command
        {
            crate::cli::Command::Run(args) => Spec::from_run(&args),
            crate::cli::Command::Connect(args) => Spec::from_connect(&args),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn intercept_flags_are_checked_before_anything_starts() {
        let ok = ["--intercept", "deployment/api", "--port", "8080:9000", "--header", "X-Dev=alice"];
        // (extra flags, what the refusal says; None: accepted)
        let mirror = ["--intercept", "deployment/api", "--port", "8080:9000", "--mirror"];
        let table: [(&[&str], &[&str], Option<&str>); 12] = [
            (&ok, &[], None),
            (&mirror, &[], None),
            (&mirror, &["--header", "x-dev=alice", "--mirror-body-limit", "64KiB"], None),
            (&ok, &["--mirror-body-limit", "1MiB"], Some("--mirror")),
            (&ok, &["--path-prefix", "/api"], None),
            (&["--intercept", "deployment/api", "--port", "8080:9000", "--path-prefix", "/api"], &[], None),
            (
                &ok,
                &["--swap", "deployment/web"],
                Some("--swap deployment/web and --intercept deployment/api were both given"),
            ),
            (
                &["--intercept", "deployment/api", "--port", "8080:9000"],
                &[],
                Some("--intercept deployment/api needs a filter"),
            ),
            (
                &["--header", "x-dev=alice"],
                &[],
                Some("--header, --baggage, --path-prefix and --mirror choose the requests of an --intercept"),
            ),
            (&["--intercept", "deployment/api", "--header", "x-dev=alice"], &[], Some("needs --port REMOTE:LOCAL")),
            (&ok, &["--transport", "udp"], Some("--transport udp cannot carry an intercept")),
            (&ok, &["--path-prefix", "api"], Some("\"api\" does not start with /")),
        ];
        for command in [&["run", "--image", "app"][..], &["connect"]] {
            for (flags, extra, want) in table {
                let cmd: Vec<&str> = command.iter().chain(flags).chain(extra).copied().collect();
                match (spec_of(&cmd), want) {
                    (Ok(spec), None) => {
                        let i = spec.intercept.expect("an intercept");
                        assert_eq!(i.target.name, "api");
                        assert_eq!(spec.session.transport, Transport::Portforward);
                        assert!(i.filter.headers.is_empty() || i.filter.headers["x-dev"] == "alice", "{cmd:?}");
                        let limit = match cmd.contains(&"64KiB") {
                            true => 64 << 10,
                            false => tpd_wire::intercept::MIRROR_BODY_LIMIT,
                        };
                        let mirror = cmd.contains(&"--mirror").then_some(Mirror { body_limit: limit });
                        assert_eq!(i.mirror, mirror, "{cmd:?}");
                    }
                    (Err(e), Some(text)) => assert!(e.message.contains(text), "{cmd:?}: {}", e.message),
                    (got, want) => panic!("{cmd:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        let auto = spec_of(&["connect", "--transport", "auto"].iter().chain(&ok).copied().collect::<Vec<_>>()).unwrap();
        assert_eq!(auto.session.transport, Transport::Portforward, "auto means the port-forward");
    }
}
