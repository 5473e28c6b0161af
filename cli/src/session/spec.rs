//! The session's [`Spec`]: what a session is asked to be, built from the
//! arguments of `tpd run`, `tpd connect` or `tpd compose`, and the one
//! thing the session machinery reads of them. It crosses to `tpd connect`'s
//! background process as JSON.

use serde::{Deserialize, Serialize};
use tpd_wire::neighbours::PodPort;
use tpd_wire::sidecar::Cidr;

use crate::cli::{ConnectArgs, PortMapping, Publish, RunArgs, Transport};
use crate::error::Hint;
use crate::swap::plan::Target;

/// What a session is asked to be, whoever starts it (`tpd run`, `tpd
/// connect`, `tpd compose up`); the developer's container, which only
/// `tpd run` has, is not part of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub swap: Option<Target>,
    pub force: bool,
    /// `--port REMOTE:LOCAL`.
    pub ports: Vec<PortMapping>,
    /// `--pod-port N[/udp]`.
    #[serde(default)]
    pub pod_ports: Vec<PodPort>,
    /// `-p HOST:CONTAINER`.
    pub publish: Vec<Publish>,
    pub also_proxy: Vec<Cidr>,
    pub transport: Transport,
    pub no_mounts: bool,
    /// Where the volumes also appear in the developer's container.
    pub mount_root: Option<String>,
    /// Seconds a volume request waits for a lost agent.
    pub volume_timeout: Option<u64>,
    /// Seconds to wait for the agent pod.
    pub ready_timeout: u64,
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
        Ok(Spec { swap: swaps.first().cloned(), ready_timeout: 120, ..Default::default() })
    }

    /// `tpd connect`'s session.
    pub fn from_connect(args: &ConnectArgs) -> Result<Self, Hint> {
        Ok(Spec {
            force: args.force,
            ports: args.ports.clone(),
            pod_ports: args.pod_ports.clone(),
            publish: args.publish.clone(),
            also_proxy: args.also_proxy.clone(),
            transport: args.transport,
            no_mounts: args.no_mounts,
            ready_timeout: args.ready_timeout,
            ..Spec::new(&args.swap)?
        })
    }

    /// `tpd run`'s session.
    pub fn from_run(args: &RunArgs) -> Self {
        Spec {
            swap: args.swap.clone(),
            force: args.force,
            ports: args.ports.clone(),
            pod_ports: args.pod_ports.clone(),
            publish: args.publish.clone(),
            also_proxy: args.also_proxy.clone(),
            transport: args.transport,
            no_mounts: args.no_mounts,
            mount_root: args.mount_root.clone(),
            volume_timeout: args.volume_timeout,
            ready_timeout: args.ready_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_crosses_to_the_holder_unchanged() {
        let spec = Spec {
            swap: Some("deployment/api:app".parse().unwrap()),
            force: true,
            ports: vec!["8080:9000".parse().unwrap()],
            pod_ports: vec!["6379".parse().unwrap(), "8125/udp".parse().unwrap()],
            publish: vec!["18080:9000".parse().unwrap()],
            also_proxy: vec!["10.0.0.0/8".parse().unwrap()],
            transport: Transport::Auto,
            no_mounts: true,
            mount_root: Some("/remote".into()),
            volume_timeout: Some(5),
            ready_timeout: 7,
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
}
