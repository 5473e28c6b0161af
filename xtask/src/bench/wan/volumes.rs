//! `bench wan --volumes`: `bench volumes`' workloads over the emulated
//! link, tpd's volume bridge against sshfs over the same link.
//!
//! - tpd: [`TunnelMount`] (the agent container serving the tree, the
//!   sidecar container FUSE-mounting it through the tunnel, measured on
//!   this host through the rshared mount) with the sidecar in a container
//!   joined only to the link's laptop side and the agent joined to its
//!   cluster side ([`Wan::attach`]): every packet of the tunnel crosses the
//!   link. Both transports: the framed stream (port-forward) and UDP.
//! - sshfs: sshd in the link's cluster namespace, sshfs's ssh client in
//!   its laptop namespace (its FUSE daemon on this host, as tpd's mount).
//!
//! Each workload runs on a fresh mount of each, so none starts with what
//! an earlier one cached. Besides the times, it prints the requests tpd's
//! mounts sent (the sidecar's count) and, for both, the time in round
//! trips of the link: a workload that costs one round trip per file shows
//! about as many as it has files.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tpd_e2e::volumes::{Placement, TunnelMount};
use tpd_wanlink::{Link, Side, Spec};
use tpd_wire::files::VolumeMount;

use super::tunnel::Wan;
use crate::bench::Figure;
use crate::bench::volumes::{SshAt, Sshd, WORKLOADS, Workload, make_tree, tunnel_images};

/// Workloads whose target is a time of at most this share of sshfs's.
const TARGET_SHARE: f64 = 0.3;

/// Measures every profile in `specs` on one generated tree; only the
/// workloads whose name contains `only`, when given.
pub fn run(specs: &[Spec], only: Option<&str>) -> Result<Vec<Figure>> {
    let work = tempfile::Builder::new().prefix("tpd-bench-wan-volumes").tempdir()?;
    let src = work.path().join("src");
    eprintln!("making the volume benchmark's tree…");
    make_tree(&src)?;
    // The agent runs as uid 65532: it must be able to create the written file.
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let mut figures = Vec::new();
    for spec in specs {
        crate::bench::go_on()?;
        figures.extend(profile(*spec, work.path(), &src, only)?);
    }
    Ok(figures)
}

fn profile(spec: Spec, work: &Path, src: &Path, only: Option<&str>) -> Result<Vec<Figure>> {
    let link = Link::up(spec).context("bringing the emulated link up (needs root and /dev/net/tun)")?;
    let wan = Wan::new(&link)?;
    let at = SshAt {
        server_netns: link.netns(Side::Cluster).into(),
        listen: Side::Cluster.addr(),
        client_netns: link.netns(Side::Laptop).into(),
    };
    let sshd = Sshd::start_at(work, Some(at))?;
    let rtt = spec.rtt.as_secs_f64();
    let mut figures = Vec::new();
    for w in WORKLOADS.iter().filter(|w| only.is_none_or(|o| w.name.contains(o))) {
        let at = |what: &str| format!("volumes {} {what} [{spec}]", w.name);
        crate::bench::go_on()?;
        eprintln!("volumes over the emulated link ({spec}): {}, sshfs…", w.name);
        let ssh = sshfs(&sshd, src, work, w)?;
        let (_, sshfs_value, _) = (w.figure)(ssh, ssh, ssh);
        eprintln!("  sshfs: {sshfs_value:.1} {}", w.unit);
        figures.push(Figure::new(at("(sshfs) in link round trips"), ssh.as_secs_f64() / rtt, "rtt"));
        for (label, udp) in [("port-forward", false), ("udp", true)] {
            crate::bench::go_on()?;
            eprintln!("volumes over the emulated link ({spec}): {}, tpd {label}…", w.name);
            let (took, requests) = tpd(&wan, src, w, udp)?;
            let (value, _, _) = (w.figure)(took, took, took);
            eprintln!("  tpd {label}: {value:.1} {}, {requests:?} file requests", w.unit);
            figures.push(Figure::new(at(&format!("(tpd {label})")), value, w.unit).against("sshfs", sshfs_value));
            let rtts = Figure::new(at(&format!("(tpd {label}) in link round trips")), took.as_secs_f64() / rtt, "rtt");
            figures.push(match requests {
                Some(n) => rtts.against("file requests sent", n as f64),
                None => rtts,
            });
        }
        let target = match w.unit {
            "ms" => TARGET_SHARE * sshfs_value,
            _ => sshfs_value,
        };
        figures.push(Figure::new(at("target for tpd"), target, w.unit).against("sshfs", sshfs_value));
    }
    Ok(figures)
}

/// Workload `w` on a fresh sshfs mount of `src` over the link.
fn sshfs(sshd: &Sshd, src: &Path, work: &Path, w: &Workload) -> Result<Duration> {
    let mnt = sshd.mount(src, work)?;
    let took = (w.run)(&mnt);
    let _ = std::process::Command::new("fusermount").arg("-u").arg(&mnt).status();
    took
}

/// Workload `w` on a fresh tpd mount of `src` across the link; its time and
/// the file requests the sidecar sent (mounting included), when it logged them.
fn tpd(wan: &Wan, src: &Path, w: &Workload, udp: bool) -> Result<(Duration, Option<u64>)> {
    let volume = VolumeMount { name: "bench".into(), mount_path: "/bench".into(), read_only: false, sub_path: None };
    let (agent_image, sidecar_image) = tunnel_images();
    let join = |agent: &str, owner: &str| -> Result<String> {
        let agent_ip = wan.attach(Side::Cluster, agent)?;
        wan.attach(Side::Laptop, owner)?;
        Ok(agent_ip.to_string())
    };
    let placement = Placement { join: Some(&join), udp, cache: true };
    let mount = TunnelMount::start_placed(&[(src.to_path_buf(), volume)], &agent_image, &sidecar_image, &placement)
        .context("starting agent and sidecar containers across the link")?;
    let took = (w.run)(&mount.paths[0])?;
    let requests = mount.requests().inspect_err(|e| eprintln!("  no request count: {e:#}")).ok();
    Ok((took, requests))
}
