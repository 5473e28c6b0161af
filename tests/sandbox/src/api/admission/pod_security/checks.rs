//! The checks of the Pod Security Standards, one function each, with
//! kube-apiserver's reasons and details (its `policy/check_*.go`).

use std::collections::BTreeSet;

use serde_json::Value;

use super::Violation;

pub type Check = fn(&Pod) -> Option<Violation>;

/// The pod spec and its containers (init, regular, ephemeral: the order
/// kube-apiserver visits them in).
pub struct Pod<'a> {
    spec: &'a Value,
    containers: Vec<&'a Value>,
}

impl<'a> Pod<'a> {
    pub fn new(spec: &'a Value) -> Self {
        let containers = ["initContainers", "containers", "ephemeralContainers"]
            .iter()
            .flat_map(|k| spec.get(*k).and_then(Value::as_array).into_iter().flatten())
            .collect();
        Self { spec, containers }
    }

    fn pod_sc(&self, field: &str) -> Option<&'a Value> {
        self.spec.get("securityContext").and_then(|s| s.get(field)).filter(|v| !v.is_null())
    }

    /// Names of the containers for which `bad` holds of their securityContext field.
    fn containers_where(&self, field: &str, bad: impl Fn(Option<&Value>) -> bool) -> Vec<&'a str> {
        self.containers.iter().filter(|c| bad(sc(c, field))).map(|c| name(c)).collect()
    }
}

fn sc<'a>(container: &'a Value, field: &str) -> Option<&'a Value> {
    container.get("securityContext").and_then(|s| s.get(field)).filter(|v| !v.is_null())
}

fn name(container: &Value) -> &str {
    container.get("name").and_then(Value::as_str).unwrap_or_default()
}

fn strings(v: Option<&Value>) -> impl Iterator<Item = &str> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
}

fn join_quote<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let quoted: Vec<String> = items.into_iter().map(|s| format!("\"{}\"", s.as_ref())).collect();
    quoted.join(", ")
}

fn pluralize(singular: &'static str, plural: &'static str, n: usize) -> &'static str {
    if n == 1 { singular } else { plural }
}

/// `container "a"` or `containers "a", "b"`.
fn containers_named(names: &[&str]) -> String {
    format!("{} {}", pluralize("container", "containers", names.len()), join_quote(names))
}

fn violation(reason: &'static str, detail: String) -> Option<Violation> {
    Some(Violation { reason, detail })
}

pub fn host_namespaces(p: &Pod) -> Option<Violation> {
    // kube-apiserver lists them sorted.
    let set: Vec<&str> = ["hostIPC", "hostNetwork", "hostPID"]
        .into_iter()
        .filter(|f| p.spec.get(*f).and_then(Value::as_bool) == Some(true))
        .collect();
    (!set.is_empty()).then(|| Violation { reason: "host namespaces", detail: set.join(", ") })
}

fn volumes<'a>(p: &Pod<'a>) -> impl Iterator<Item = &'a Value> {
    p.spec.get("volumes").and_then(Value::as_array).into_iter().flatten()
}

pub fn host_path_volumes(p: &Pod) -> Option<Violation> {
    let names: Vec<&str> = volumes(p).filter(|v| v.get("hostPath").is_some_and(|h| !h.is_null())).map(name).collect();
    if names.is_empty() {
        return None;
    }
    violation("hostPath volumes", format!("{} {}", pluralize("volume", "volumes", names.len()), join_quote(&names)))
}

pub fn host_ports(p: &Pod) -> Option<Violation> {
    let mut ports = BTreeSet::new();
    let mut bad = Vec::new();
    for c in &p.containers {
        let used: Vec<String> = c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|port| port.get("hostPort").and_then(Value::as_i64).filter(|n| *n != 0))
            .map(|n| n.to_string())
            .collect();
        if !used.is_empty() {
            bad.push(name(c));
            ports.extend(used);
        }
    }
    if bad.is_empty() {
        return None;
    }
    // Sorted as strings, as kube-apiserver's string set.
    let ports: Vec<String> = ports.into_iter().collect();
    violation(
        "hostPort",
        format!(
            "{} {} {} {}",
            containers_named(&bad),
            pluralize("uses", "use", bad.len()),
            pluralize("hostPort", "hostPorts", ports.len()),
            ports.join(", ")
        ),
    )
}

pub fn privileged(p: &Pod) -> Option<Violation> {
    let bad = p.containers_where("privileged", |v| v.and_then(Value::as_bool) == Some(true));
    if bad.is_empty() {
        return None;
    }
    violation("privileged", format!("{} must not set securityContext.privileged=true", containers_named(&bad)))
}

pub fn proc_mount(p: &Pod) -> Option<Violation> {
    fn bad_value(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).filter(|m| *m != "Default")
    }
    let bad = p.containers_where("procMount", |v| bad_value(v).is_some());
    if bad.is_empty() {
        return None;
    }
    let types: BTreeSet<&str> = p.containers.iter().filter_map(|c| bad_value(sc(c, "procMount"))).collect();
    violation(
        "procMount",
        format!("{} must not set securityContext.procMount to {}", containers_named(&bad), join_quote(types)),
    )
}

pub fn se_linux_options(p: &Pod) -> Option<Violation> {
    const ALLOWED_TYPES: [&str; 4] = ["", "container_t", "container_init_t", "container_kvm_t"];
    let (mut types, mut user, mut role) = (BTreeSet::new(), false, false);
    let mut valid = |opts: Option<&Value>| {
        let Some(opts) = opts else { return true };
        let field = |f: &str| opts.get(f).and_then(Value::as_str).unwrap_or_default().to_owned();
        let (t, u, r) = (field("type"), field("user"), field("role"));
        let ok_type = ALLOWED_TYPES.contains(&t.as_str());
        if !ok_type {
            types.insert(t);
        }
        user |= !u.is_empty();
        role |= !r.is_empty();
        ok_type && u.is_empty() && r.is_empty()
    };
    let mut setters = Vec::new();
    if !valid(p.pod_sc("seLinuxOptions")) {
        setters.push("pod".to_owned());
    }
    let bad: Vec<&str> = p.containers.iter().filter(|c| !valid(sc(c, "seLinuxOptions"))).map(|c| name(c)).collect();
    if !bad.is_empty() {
        setters.push(containers_named(&bad));
    }
    if setters.is_empty() {
        return None;
    }
    // As kube-apiserver words it: user and role are named only beside a bad type.
    let mut data = Vec::new();
    if !types.is_empty() {
        data.push(format!("{} {}", pluralize("type", "types", types.len()), join_quote(&types)));
        if user {
            data.push("user may not be set".to_owned());
        }
        if role {
            data.push("role may not be set".to_owned());
        }
    }
    violation(
        "seLinuxOptions",
        format!("{} set forbidden securityContext.seLinuxOptions: {}", setters.join(" and "), data.join("; ")),
    )
}

pub fn sysctls(p: &Pod) -> Option<Violation> {
    const ALLOWED: [&str; 12] = [
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
    ];
    let bad: Vec<&str> = p
        .pod_sc("sysctls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("name").and_then(Value::as_str))
        .filter(|n| !ALLOWED.contains(n))
        .collect();
    (!bad.is_empty()).then(|| Violation { reason: "forbidden sysctls", detail: bad.join(", ") })
}

pub fn capabilities_baseline(p: &Pod) -> Option<Violation> {
    const DEFAULT_SET: [&str; 13] = [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let added = |c: &Value| -> Vec<String> {
        strings(sc(c, "capabilities").and_then(|caps| caps.get("add")))
            .filter(|cap| !DEFAULT_SET.contains(cap))
            .map(str::to_owned)
            .collect()
    };
    let bad: Vec<&str> = p.containers.iter().filter(|c| !added(c).is_empty()).map(|c| name(c)).collect();
    if bad.is_empty() {
        return None;
    }
    let caps: BTreeSet<String> = p.containers.iter().flat_map(|c| added(c)).collect();
    violation(
        "non-default capabilities",
        format!("{} must not include {} in securityContext.capabilities.add", containers_named(&bad), join_quote(caps)),
    )
}

fn valid_seccomp(profile: &Value) -> bool {
    matches!(profile.get("type").and_then(Value::as_str), Some("RuntimeDefault" | "Localhost"))
}

/// Who sets a seccomp profile other than RuntimeDefault or Localhost, and
/// which; and the containers that set none.
fn seccomp<'a>(p: &Pod<'a>) -> (Vec<String>, BTreeSet<String>, Vec<&'a str>) {
    let (mut setters, mut values) = (Vec::new(), BTreeSet::new());
    let pod_profile = p.pod_sc("seccompProfile");
    let mut note = |profile: &Value| {
        values.insert(profile.get("type").and_then(Value::as_str).unwrap_or_default().to_owned());
    };
    if let Some(profile) = pod_profile.filter(|pr| !valid_seccomp(pr)) {
        setters.push("pod".to_owned());
        note(profile);
    }
    let mut explicit = Vec::new();
    let mut unset = Vec::new();
    for c in &p.containers {
        match sc(c, "seccompProfile") {
            Some(profile) if !valid_seccomp(profile) => {
                explicit.push(name(c));
                note(profile);
            }
            Some(_) => {}
            None if !pod_profile.is_some_and(valid_seccomp) => unset.push(name(c)),
            None => {}
        }
    }
    if !explicit.is_empty() {
        setters.push(containers_named(&explicit));
    }
    (setters, values, unset)
}

fn seccomp_bad_setters(setters: &[String], values: &BTreeSet<String>) -> Option<Violation> {
    violation(
        "seccompProfile",
        format!("{} must not set securityContext.seccompProfile.type to {}", setters.join(" and "), join_quote(values)),
    )
}

pub fn seccomp_baseline(p: &Pod) -> Option<Violation> {
    let (setters, values, _) = seccomp(p);
    if setters.is_empty() { None } else { seccomp_bad_setters(&setters, &values) }
}

pub fn seccomp_restricted(p: &Pod) -> Option<Violation> {
    let (setters, values, unset) = seccomp(p);
    if !setters.is_empty() {
        return seccomp_bad_setters(&setters, &values);
    }
    if unset.is_empty() {
        return None;
    }
    violation(
        "seccompProfile",
        format!(
            "pod or {} must set securityContext.seccompProfile.type to \"RuntimeDefault\" or \"Localhost\"",
            containers_named(&unset)
        ),
    )
}

pub fn allow_privilege_escalation(p: &Pod) -> Option<Violation> {
    let bad = p.containers_where("allowPrivilegeEscalation", |v| v.and_then(Value::as_bool) != Some(false));
    if bad.is_empty() {
        return None;
    }
    violation(
        "allowPrivilegeEscalation != false",
        format!("{} must set securityContext.allowPrivilegeEscalation=false", containers_named(&bad)),
    )
}

pub fn capabilities_restricted(p: &Pod) -> Option<Violation> {
    fn caps(c: &Value) -> Option<&Value> {
        sc(c, "capabilities")
    }
    let missing_drop: Vec<&str> = p
        .containers
        .iter()
        .filter(|c| !strings(caps(c).and_then(|k| k.get("drop"))).any(|d| d == "ALL"))
        .map(|c| name(c))
        .collect();
    let added = |c: &Value| -> Vec<String> {
        strings(caps(c).and_then(|k| k.get("add"))).filter(|a| *a != "NET_BIND_SERVICE").map(str::to_owned).collect()
    };
    let adding: Vec<&str> = p.containers.iter().filter(|c| !added(c).is_empty()).map(|c| name(c)).collect();
    let mut details = Vec::new();
    if !missing_drop.is_empty() {
        details
            .push(format!("{} must set securityContext.capabilities.drop=[\"ALL\"]", containers_named(&missing_drop)));
    }
    if !adding.is_empty() {
        let forbidden: BTreeSet<String> = p.containers.iter().flat_map(|c| added(c)).collect();
        details.push(format!(
            "{} must not include {} in securityContext.capabilities.add",
            containers_named(&adding),
            join_quote(forbidden)
        ));
    }
    if details.is_empty() {
        return None;
    }
    violation("unrestricted capabilities", details.join("; "))
}

pub fn restricted_volumes(p: &Pod) -> Option<Violation> {
    const ALLOWED: [&str; 8] =
        ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];
    let bad: BTreeSet<&str> = volumes(p)
        .filter(|v| !ALLOWED.iter().any(|kind| v.get(*kind).is_some_and(|s| !s.is_null())))
        .map(name)
        .collect();
    if bad.is_empty() {
        return None;
    }
    // Go's %q of a string slice: ["a" "b"].
    let listed: Vec<String> = bad.iter().map(|n| format!("\"{n}\"")).collect();
    violation("restricted volume types", format!("volumes [{}] have restricted types", listed.join(" ")))
}

pub fn run_as_non_root(p: &Pod) -> Option<Violation> {
    let pod = p.pod_sc("runAsNonRoot").and_then(Value::as_bool);
    let mut setters = Vec::new();
    if pod == Some(false) {
        setters.push("pod".to_owned());
    }
    let explicit = p.containers_where("runAsNonRoot", |v| v.and_then(Value::as_bool) == Some(false));
    if !explicit.is_empty() {
        setters.push(containers_named(&explicit));
    }
    if !setters.is_empty() {
        return violation(
            "runAsNonRoot != true",
            format!("{} must not set securityContext.runAsNonRoot=false", setters.join(" and ")),
        );
    }
    let implicit = p.containers_where("runAsNonRoot", |v| v.is_none() && pod != Some(true));
    if implicit.is_empty() {
        return None;
    }
    violation(
        "runAsNonRoot != true",
        format!("pod or {} must set securityContext.runAsNonRoot=true", containers_named(&implicit)),
    )
}

pub fn run_as_user(p: &Pod) -> Option<Violation> {
    let root = |v: Option<&Value>| v.and_then(Value::as_i64) == Some(0);
    let mut setters = Vec::new();
    if root(p.pod_sc("runAsUser")) {
        setters.push("pod".to_owned());
    }
    let bad = p.containers_where("runAsUser", root);
    if !bad.is_empty() {
        setters.push(containers_named(&bad));
    }
    if setters.is_empty() {
        return None;
    }
    violation("runAsUser=0", format!("{} must not set runAsUser=0", setters.join(" and ")))
}
