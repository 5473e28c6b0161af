//! The identity the agent runs with: the swapped container's, as the kubelet
//! computes it from the container's and the pod's securityContext, so the
//! agent reads and writes the pod's volumes exactly as the app did; and
//! never more privilege than that container had.
//!
//! The pod's own securityContext (fsGroup, supplementalGroups, sysctls) is
//! not touched by a swap, so the agent gets those from the pod like any of
//! its containers; what is written here is the container's part, with the
//! pod-level defaults it inherits made explicit.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Capabilities, PodSecurityContext, SeccompProfile, SecurityContext};
use tpd_wire::names;

/// What a container runtime (containerd, CRI-O, Docker) gives a container
/// that asks for no capabilities.
const RUNTIME_DEFAULT_CAPS: [&str; 14] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// The capabilities a root agent keeps when the container had them: to
/// write, rename, chmod and chown files of other users in the volumes, as a
/// root app can, and to listen on the container's ports below 1024. A
/// non-root process has no effective capabilities (Kubernetes sets no
/// ambient ones), so a non-root agent gets none.
const AGENT_CAPS: [&str; 5] = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "NET_BIND_SERVICE"];

/// The agent's securityContext in place of a container with `container`'s,
/// in a pod with `pod`'s:
/// - the user, group and runAsNonRoot the container ran with (its own
///   fields over the pod's); where neither names a user the container ran
///   as its image's default, root, and so does the agent (its image's
///   default is [`names::AGENT_UID`]); a runAsNonRoot container without a
///   uid gets [`names::AGENT_UID`], since a non-root uid is all that is known;
/// - never escalating, a read-only root, all capabilities dropped but the
///   few of [`AGENT_CAPS`] a root container had;
/// - the container's SELinux, AppArmor and seccomp profiles; RuntimeDefault
///   seccomp where neither it nor the pod names one.
pub fn agent_security_context(
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
) -> SecurityContext {
    let own = |f: fn(&SecurityContext) -> Option<i64>| container.and_then(f);
    let inherited = |f: fn(&PodSecurityContext) -> Option<i64>| pod.and_then(f);
    let run_as_non_root = container.and_then(|c| c.run_as_non_root).or_else(|| pod.and_then(|p| p.run_as_non_root));
    let user = own(|c| c.run_as_user).or_else(|| inherited(|p| p.run_as_user));
    let group = own(|c| c.run_as_group).or_else(|| inherited(|p| p.run_as_group));
    let (user, group) = match (user, run_as_non_root) {
        (Some(user), _) => (user, group),
        (None, Some(true)) => (names::AGENT_UID.into(), group.or(Some(names::AGENT_UID.into()))),
        (None, _) => (0, group),
    };
    let add: Vec<String> = if user == 0 {
        let had = effective_caps(container);
        AGENT_CAPS.iter().filter(|c| had.contains(**c)).map(|c| (*c).to_owned()).collect()
    } else {
        Vec::new()
    };
    let pod_seccomp = pod.and_then(|p| p.seccomp_profile.as_ref());
    let seccomp_profile = container.and_then(|c| c.seccomp_profile.clone()).or_else(|| {
        pod_seccomp.is_none().then(|| SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None })
    });
    SecurityContext {
        run_as_user: Some(user),
        run_as_group: group,
        run_as_non_root,
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: (!add.is_empty()).then_some(add) }),
        se_linux_options: container.and_then(|c| c.se_linux_options.clone()),
        app_armor_profile: container.and_then(|c| c.app_armor_profile.clone()),
        seccomp_profile,
        ..Default::default()
    }
}

/// The capabilities the container's processes had as root, applied in
/// containerd's order: the runtime's defaults; all with add ALL; none with
/// drop ALL; then each one added; then each one dropped. All for a
/// privileged container.
fn effective_caps(c: Option<&SecurityContext>) -> BTreeSet<String> {
    let all = || RUNTIME_DEFAULT_CAPS.iter().chain(&AGENT_CAPS).map(|c| (*c).to_owned()).collect::<BTreeSet<_>>();
    if c.and_then(|c| c.privileged) == Some(true) {
        return all();
    }
    let caps = c.and_then(|c| c.capabilities.as_ref());
    let names = |list: Option<&Vec<String>>| -> BTreeSet<String> {
        list.into_iter().flatten().map(|n| n.trim_start_matches("CAP_").to_ascii_uppercase()).collect()
    };
    let (drop, add) = (names(caps.and_then(|c| c.drop.as_ref())), names(caps.and_then(|c| c.add.as_ref())));
    let mut had: BTreeSet<String> = RUNTIME_DEFAULT_CAPS.iter().map(|c| (*c).to_owned()).collect();
    if add.contains("ALL") {
        had = all();
    }
    if drop.contains("ALL") {
        had.clear();
    }
    had.extend(add.into_iter().filter(|c| c != "ALL"));
    had.retain(|c| !drop.contains(c));
    had
}
