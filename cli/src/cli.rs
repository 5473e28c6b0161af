//! The command line: global options shared by every subcommand, and the
//! subcommands themselves (one module each under `commands/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tpd_wire::intercept::{Filter, Mirror};
use tpd_wire::neighbours::PodPort;
use tpd_wire::sidecar::Cidr;

use crate::error::Hint;
use crate::output::OutputFormat;
use crate::swap::plan::Target;

#[derive(Debug, Parser)]
#[command(
    name = "tpd",
    version = tpd_wire::VERSION,
    about = "Run a local Docker container as if it were a pod of your Kubernetes cluster",
    long_about = "Run a local Docker container as if it were a pod of your Kubernetes cluster.\n\n\
        Your container reaches cluster services by DNS name, receives the traffic meant for the \
        Deployment it swaps, sees that Deployment's environment and volumes, and when it stops \
        the cluster is exactly as before.\n\n\
        Start with `tpd doctor` to check that Docker and your cluster are ready."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand understands.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// More logs on stderr: --verbose for debug, twice for trace. (`-v` is
    /// `tpd run`'s volume flag, as in `docker run`.)
    #[arg(long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Output format for commands that report something.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text, global = true)]
    pub output: OutputFormat,
    /// Kubeconfig file to use (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, else "default").
    #[arg(short, long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// The sidecar image [env: TPD_SIDECAR_IMAGE; config: sidecar_image].
    #[arg(long, global = true, env = "TPD_SIDECAR_IMAGE", value_name = "IMAGE")]
    pub sidecar_image: Option<String>,
    /// The agent image the cluster runs [env: TPD_AGENT_IMAGE; config: agent_image].
    #[arg(long, global = true, env = "TPD_AGENT_IMAGE", value_name = "IMAGE")]
    pub agent_image: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that Docker, the tpd images and the cluster are ready, and say how to fix what is not.
    Doctor,
    /// Print the versions of tpd and of the images it uses.
    Version,
    /// Run a docker-compose project with some services in a tpd session (or print the override).
    Compose(Box<ComposeArgs>),
    /// Run a local container in the cluster's network, optionally swapped in for a Deployment.
    Run(Box<RunArgs>),
    /// Start a long-lived session in the background (outbound access, optional swap) that containers join.
    Connect(Box<ConnectArgs>),
    /// End a session `tpd connect` started: restore its swap, remove its agent pod and sidecar.
    Quit(QuitArgs),
    /// Print or write the environment a Deployment's container gets, for IDEs and scripts.
    Env(EnvArgs),
    /// List this machine's sessions and the swaps in the namespace, with holder and lease.
    Status(StatusArgs),
    /// Put a swapped or intercepted Deployment back as it was (normally tpd does this itself).
    Restore(RestoreArgs),
    /// Restores the session's Deployment when its `tpd run` dies (started by `tpd run`).
    #[command(hide = true)]
    Guardian(GuardianArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  tpd run --image myapp:dev --swap deployment/hello --port 8080:9000 -- python3 -m http.server 9000\n\n\
    Personal intercepts: two developers work on deployment/api at once, each receiving only the\n\
    requests that carry their header, while the real pods keep serving everyone else:\n  \
    alice$ tpd run --image api:dev --intercept deployment/api --port 8080:8080 --header x-dev=alice\n  \
    bob$   tpd run --image api:dev --intercept deployment/api --port 8080:8080 --header x-dev=bob\n  \
    curl -H 'x-dev: alice' http://api:8080/   # anywhere in the cluster: alice's container answers\n\
    --path-prefix /P narrows it further (every filter must match). Filters are matched on HTTP\n\
    requests to the container's REMOTE port; it must be a port the container declares.\n\n\
    The pod's other containers are on localhost, as in the pod: the ports they declare, and any\n\
    port tpd finds listening on the pod's 127.0.0.1, ::1, 0.0.0.0 or :: (checked every 2 s), reach\n\
    127.0.0.1:PORT in your container through the tunnel (add one by hand with --pod-port). The\n\
    swapped container's own ports stay yours. A pod port your container already listens on stays\n\
    yours too, and tpd prints a warning naming it."
)]
pub struct RunArgs {
    /// The local image to run (it must exist in the local Docker engine).
    #[arg(long, value_name = "IMAGE")]
    pub image: String,
    /// Swap this Deployment's container for tpd's agent: deployment/NAME[:CONTAINER].
    #[arg(long, value_name = "deployment/NAME[:CONTAINER]")]
    pub swap: Option<Target>,
    /// Take only the requests that match --header/--baggage/--path-prefix from this
    /// Deployment's container; the real container keeps serving the rest,
    /// and others may intercept it too with other filters.
    #[arg(long, value_name = "deployment/NAME[:CONTAINER]")]
    pub intercept: Option<Target>,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub session: SessionArgs,
    /// Set an env var in your container (overrides the remote env).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read env vars from a file of KEY=VALUE lines.
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Bind mount into your container, as in `docker run -v`.
    #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:ro]")]
    pub volumes: Vec<String>,
    /// Keep stdin open.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a TTY.
    #[arg(short, long)]
    pub tty: bool,
    /// Name of your container.
    #[arg(long)]
    pub name: Option<String>,
    /// Memory limit of your container, as in `docker run -m` (e.g. 512m, 2g).
    #[arg(short = 'm', long, value_name = "BYTES", value_parser = parse_bytes)]
    pub memory: Option<i64>,
    /// Where all remote volumes also appear in your container.
    #[arg(long, value_name = "PATH")]
    pub mount_root: Option<String>,
    /// How long a file operation on the remote volumes waits for the agent
    /// to come back (its pod replaced, the connection lost) before it fails
    /// with EIO [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub volume_timeout: Option<u64>,
    /// The command and its arguments (default: the image's).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// What `tpd run` and `tpd connect` share: how the session reaches the
/// cluster and what it carries. It crosses to `tpd connect`'s background
/// process inside the session's `Spec`.
#[derive(Debug, Clone, Default, PartialEq, Args, serde::Serialize, serde::Deserialize)]
pub struct SessionArgs {
    /// Take over a swap whose lease expired without waiting for automatic repair.
    #[arg(long, requires = "swap")]
    pub force: bool,
    /// Cluster traffic to the swapped (or intercepted) container's REMOTE
    /// port goes to LOCAL in the session (your container, for `tpd run`).
    #[arg(long = "port", value_name = "REMOTE:LOCAL")]
    pub ports: Vec<PortMapping>,
    /// Also reach this port of the pod's loopback on 127.0.0.1 in the
    /// session (N for TCP, N/udp), held from the start. Repeatable. The
    /// ports the pod's other containers declare, and those tpd finds
    /// listening in the pod, are reachable without it; it is for a helper
    /// that declares none and starts listening after your app starts.
    #[arg(long = "pod-port", value_name = "N[/udp]")]
    #[serde(default)]
    pub pod_ports: Vec<PodPort>,
    /// Publish a port of the session (your container, for `tpd run`) on the
    /// host: HOST:CONTAINER.
    #[arg(short = 'p', long = "publish", value_name = "HOST:CONTAINER")]
    pub publish: Vec<Publish>,
    /// How WireGuard reaches the agent. The key exchange always goes over a
    /// port-forward; `udp` needs the cluster's nodes reachable over UDP from
    /// this machine, and `auto` falls back to the port-forward when the
    /// first handshake over UDP gets no answer within 2 s. `tpd status`
    /// shows which one a session uses.
    #[arg(long, value_enum, default_value_t = Transport::Portforward)]
    pub transport: Transport,
    /// Also route this IPv4 CIDR (e.g. 10.0.0.0/8) through the cluster. Repeatable.
    #[arg(long, value_name = "CIDR")]
    pub also_proxy: Vec<Cidr>,
    /// Do not mount the swapped Deployment's volumes.
    #[arg(long)]
    pub no_mounts: bool,
    /// `off`: every file operation on the remote volumes asks the pod, so a
    /// change made there shows at once (slow over a distant cluster). `on`:
    /// names, attributes and missing names are kept until the agent says
    /// they changed (see docs/volumes.md for how stale they can be).
    #[arg(long, value_enum, default_value_t = VolumeCache::On, value_name = "on|off")]
    #[serde(default)]
    pub volume_cache: VolumeCache,
    /// How long to wait for the agent pod to become ready.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub ready_timeout: u64,
}

/// Which requests an `--intercept` takes; every filter given must match.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct FilterArgs {
    /// With --intercept: only requests that carry this header with this
    /// exact value (the name in any case). Repeatable.
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = tpd_wire::intercept::parse_header)]
    pub headers: Vec<(String, String)>,
    /// With --intercept: only requests whose path starts with this.
    #[arg(long, value_name = "/PATH", value_parser = path_prefix)]
    pub path_prefix: Option<String>,
    /// With --intercept: only requests whose W3C `baggage` header has this
    /// member (what OpenTelemetry passes from service to service, so an
    /// intercept two hops down still sees it). Repeatable.
    #[arg(long = "baggage", value_name = "KEY=VALUE", value_parser = tpd_wire::intercept::parse_baggage)]
    pub baggage: Vec<(String, String)>,
    /// With --intercept: take nothing; the real container answers every
    /// request as before, and your app gets a copy of each one that
    /// matches the filters (of every request, without one), whose answer
    /// is thrown away. Copies your app is too slow for are dropped and
    /// counted (`tpd status`); the real requests never wait for them.
    #[arg(long)]
    pub mirror: bool,
    /// With --mirror: copy at most this much of a request body (e.g. 64KiB,
    /// 4MiB); a longer one is cut there and carries `tpd-mirror-truncated`.
    #[arg(long, value_name = "SIZE", value_parser = byte_size, requires = "mirror")]
    pub mirror_body_limit: Option<u64>,
}

impl FilterArgs {
    pub fn filter(&self) -> Filter {
        Filter {
            headers: self.headers.iter().cloned().collect(),
            path_prefix: self.path_prefix.clone(),
            baggage: self.baggage.iter().cloned().collect(),
        }
    }

    pub fn mirror(&self) -> Option<Mirror> {
        let body_limit = self.mirror_body_limit.unwrap_or(tpd_wire::intercept::MIRROR_BODY_LIMIT);
        self.mirror.then_some(Mirror { body_limit })
    }
}

/// `1048576`, `64KiB`, `4MiB` or `1GiB`.
fn byte_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("{s:?} is not a size: write bytes, or a number with KiB, MiB or GiB")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size: e.g. 1048576 or 1MiB"))?;
    n.checked_mul(scale).ok_or_else(|| format!("{s} is too large"))
}

fn path_prefix(s: &str) -> Result<String, String> {
    match s.starts_with('/') {
        true => Ok(s.to_owned()),
        false => Err(format!("{s:?} does not start with /; e.g. --path-prefix /api")),
    }
}

/// `--port REMOTE:LOCAL`: cluster traffic to the swapped container's port
/// `remote` reaches port `local` in the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortMapping {
    pub remote: u16,
    pub local: u16,
}

/// `-p HOST:CONTAINER`: the session's port `container` published on the host's `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Publish {
    pub host: u16,
    pub container: u16,
}

/// `A:B`, two ports from 1 to 65535.
fn port_pair(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not PORT:PORT (two numbers from 1 to 65535)");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
    Ok((port(a)?, port(b)?))
}

impl std::str::FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        port_pair(s).map(|(remote, local)| PortMapping { remote, local })
    }
}

impl std::str::FromStr for Publish {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        port_pair(s).map(|(host, container)| Publish { host, container })
    }
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.container)
    }
}

/// `--volume-cache`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeCache {
    #[default]
    On,
    Off,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP if the first handshake is answered within 2 s, else the port-forward.
    Auto,
    /// WireGuard over a Kubernetes port-forward: works on every cluster.
    #[default]
    Portforward,
    /// WireGuard over UDP to a NodePort Service tpd creates for the session and deletes with it.
    Udp,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    tpd connect                                         # outbound access; prints the sidecar's name\n  \
    docker run --rm --network container:$(tpd connect) myapp:dev\n  \
    tpd connect --name dev --swap deployment/api --port 8080:9000\n  \
    tpd connect --name mine --intercept deployment/api --port 8080:9000 --header x-dev=alice\n  \
    tpd quit dev")]
pub struct ConnectArgs {
    /// The session's name (default: CONTEXT-NAMESPACE); `tpd compose --session` and `tpd quit` use it.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Swap this Deployment's container for tpd's agent: deployment/NAME[:CONTAINER].
    #[arg(long, value_name = "deployment/NAME[:CONTAINER]")]
    pub swap: Vec<Target>,
    /// Take only the requests that match --header/--baggage/--path-prefix from this
    /// Deployment's container (see `tpd run --help`).
    #[arg(long, value_name = "deployment/NAME[:CONTAINER]")]
    pub intercept: Option<Target>,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub session: SessionArgs,
    /// Hold the session in this process (what the background process runs).
    #[arg(long, hide = true)]
    pub hold: bool,
}

#[derive(Debug, Args)]
pub struct QuitArgs {
    /// The session's name (default: CONTEXT-NAMESPACE, as `tpd connect` names it).
    #[arg(conflicts_with = "all")]
    pub name: Option<String>,
    /// Every session `tpd connect` started on this machine.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// deployment/NAME[:CONTAINER]
    pub target: Target,
    #[arg(long, value_enum, default_value_t = EnvFormat::Dotenv)]
    pub format: EnvFormat,
    /// Write to this file (mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EnvFormat {
    Dotenv,
    Json,
    Compose,
    Docker,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Swaps in every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// deployment/NAME
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub target: Option<Target>,
    /// Every swapped or intercepted Deployment in the namespace (with -A, in every namespace).
    #[arg(long)]
    pub all: bool,
    #[arg(short = 'A', long, requires = "all")]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
pub struct GuardianArgs {
    #[arg(long)]
    pub session: String,
    /// The swapped Deployment, if any.
    #[arg(long)]
    pub deployment: Option<String>,
}

/// `512m`, `2g`, `1048576`: a size as `docker run -m` takes it (b, k, m, g;
/// powers of 1024).
fn parse_bytes(s: &str) -> Result<i64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (digits, unit) = match lower.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => lower.split_at(i),
        None => (lower.as_str(), ""),
    };
    let shift = match unit.trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => return Err(format!("{s:?} is not a size: use a number of bytes with b, k, m or g, e.g. 512m")),
    };
    let n: i64 = digits.parse().map_err(|_| format!("{s:?} is not a size: e.g. 512m or 2g"))?;
    n.checked_mul(1 << shift).filter(|b| *b > 0).ok_or_else(|| format!("{s:?} is not a usable memory limit"))
}

// `tpd compose`'s command line.

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
        tpd compose --swap deployment/api --service api -- up            # its own session, ended with compose\n  \
        tpd compose --session dev --swap deployment/api --service api -- up   # a `tpd connect --name dev` session\n  \
        tpd compose --intercept deployment/api --header x-dev=alice --port 8080:8080 --service api -- up\n  \
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
    #[arg(long, value_name = "deployment/NAME", group = "deployment")]
    pub swap: Vec<String>,
    /// A Deployment the session intercepts (for `up`'s own session, with
    /// --header/--baggage/--path-prefix); the --service replaces it.
    #[arg(long, value_name = "deployment/NAME", group = "deployment")]
    pub intercept: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// The compose service that replaces the N-th --swap (or the --intercept).
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
    /// For `up`'s own session: cluster traffic to the swapped (or
    /// intercepted) container's REMOTE port goes to LOCAL.
    #[arg(long = "port", value_name = "REMOTE:LOCAL", requires = "deployment", conflicts_with = "session")]
    pub ports: Vec<PortMapping>,
    /// For `up`'s own session: also reach this port of the pod's loopback on 127.0.0.1 (N or N/udp).
    #[arg(long = "pod-port", value_name = "N[/udp]", conflicts_with = "session")]
    pub pod_ports: Vec<tpd_wire::neighbours::PodPort>,
    /// For `up`'s own session: `off` makes every file operation on the
    /// remote volumes ask the pod (see `tpd run --help`).
    #[arg(long, value_enum, default_value_t = VolumeCache::On, value_name = "on|off", conflicts_with = "session")]
    pub volume_cache: VolumeCache,
}

impl Choice {
    /// `(deployment/NAME, service)` pairs, in the order given (the
    /// `--intercept`, if any, is the only one).
    pub fn pairs(&self) -> Result<Vec<(String, String)>, Hint> {
        let deployments: Vec<&String> = self.swap.iter().chain(&self.intercept).collect();
        if deployments.len() != self.service.len() {
            let flag = if self.intercept.is_some() { "--intercept" } else { "--swap" };
            return Err(Hint::new(
                format!("{} {flag} but {} --service", deployments.len(), self.service.len()),
                format!(
                    "give each {flag} deployment/NAME the compose service that replaces it: {flag} deployment/api --service api"
                ),
            ));
        }
        if self.session.is_some() && !self.filter.filter().is_empty() {
            return Err(Hint::new(
                "--header, --baggage and --path-prefix are for the session `up` starts, and --session was given",
                "the session keeps the filter it was started with (`tpd connect --intercept ... --header ...`)",
            ));
        }
        Ok(deployments.into_iter().cloned().zip(self.service.iter().cloned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::{Cli, Command, PortMapping, Publish, parse_bytes};
    use clap::Parser as _;

    #[test]
    fn compose_pairs_an_intercept_with_its_service() {
        let choice = |args: &[&str]| match Cli::try_parse_from(["tpd", "compose"].iter().chain(args)) {
            Ok(Cli { command: Command::Compose(c), .. }) => Ok(c.choice),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let ok =
            ["--intercept", "deployment/api", "--header", "x-dev=alice", "--port", "8080:8080", "--service", "api"];
        let c = choice(&ok).unwrap();
        assert_eq!(c.pairs().unwrap(), vec![("deployment/api".to_owned(), "api".to_owned())]);
        assert_eq!(c.filter.filter().to_string(), "x-dev=alice");
        let both = choice(&["--swap", "deployment/a", "--intercept", "deployment/b", "--service", "a"]).unwrap_err();
        assert!(both.contains("--swap") && both.contains("--intercept"), "{both}");
        let unpaired = choice(&["--intercept", "deployment/api", "--header", "x-dev=a"]).unwrap().pairs().unwrap_err();
        assert_eq!(unpaired.message, "1 --intercept but 0 --service");
        let held =
            choice(&["--session", "dev", "--intercept", "deployment/api", "--header", "x-dev=a", "--service", "api"]);
        assert!(held.unwrap().pairs().unwrap_err().message.contains("--session was given"));
        assert!(choice(&["--port", "8080:8080"]).unwrap_err().contains("--swap"), "--port needs a Deployment");
    }

    #[test]
    fn port_pairs_name_their_sides() {
        assert_eq!("8080:9000".parse(), Ok(PortMapping { remote: 8080, local: 9000 }));
        assert_eq!("18080:80".parse(), Ok(Publish { host: 18080, container: 80 }));
        assert_eq!(Publish { host: 18080, container: 80 }.to_string(), "18080:80");
        for bad in ["8080", "0:80", "80:", "a:b", "70000:80"] {
            let err = bad.parse::<PortMapping>().unwrap_err();
            assert!(err.contains("is not PORT:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_read_as_docker_reads_them() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("32m"), Ok(32 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("512kb"), Ok(512 << 10));
        assert!(parse_bytes("12x").is_err());
        assert!(parse_bytes("m").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
