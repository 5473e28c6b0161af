//! Pure translations between Kubernetes and Docker: a pod container to a
//! Docker create request, Docker's container state to a container status,
//! and the pod status built from them.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, ContainerState, ContainerStateStatusEnum, HostConfig};
use k8s_openapi::api::core::v1::{
    Container, ContainerState as K8sState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::env::expand;
use super::runtime::{
    LABEL_ATTEMPT, LABEL_CONTAINER, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID, PAUSE_CONTAINER, PAUSE_IMAGE,
};
use crate::layout;

/// The Docker name of a pod's container (`POD` for the pause container).
pub fn container_name(instance: &str, pod: &Pod, container: &str, attempt: u32) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    format!(
        "{instance}-{}-{}-{}-{container}-{attempt}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default(),
        &uid[..uid.len().min(8)],
    )
}

pub fn labels(instance: &str, pod: &Pod, container: &str, attempt: u32) -> HashMap<String, String> {
    let m = &pod.metadata;
    [
        (layout::LABEL_INSTANCE, instance),
        (LABEL_POD_UID, m.uid.as_deref().unwrap_or_default()),
        (LABEL_POD_NAMESPACE, m.namespace.as_deref().unwrap_or("default")),
        (LABEL_POD_NAME, m.name.as_deref().unwrap_or_default()),
        (LABEL_CONTAINER, container),
        (LABEL_ATTEMPT, &attempt.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The pause container: it alone joins the instance network, and carries
/// the pod's hostname and /etc/hosts that its containers inherit.
pub fn pause_body(instance: &str, pod: &Pod) -> ContainerCreateBody {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = pod.spec.as_ref();
    let hostname = spec.and_then(|s| s.hostname.clone()).or_else(|| pod.metadata.name.clone()).unwrap_or_default();
    let domain =
        spec.and_then(|s| s.subdomain.as_deref()).map(|sub| format!("{sub}.{ns}.svc.{}", layout::CLUSTER_DOMAIN));
    ContainerCreateBody {
        image: Some(PAUSE_IMAGE.into()),
        hostname: Some(hostname.chars().take(63).collect()),
        domainname: domain,
        labels: Some(labels(instance, pod, PAUSE_CONTAINER, 0)),
        host_config: Some(HostConfig {
            network_mode: Some(super::runtime::network_name(instance)),
            // spec.hostAliases become /etc/hosts lines, shared by the pod.
            extra_hosts: spec.and_then(|s| s.host_aliases.as_ref()).map(|aliases| {
                aliases
                    .iter()
                    .flat_map(|a| a.hostnames.iter().flatten().map(move |h| format!("{h}:{}", a.ip)))
                    .collect()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A pod container, joined to the pause container's network namespace.
pub fn container_body(
    instance: &str,
    pod: &Pod,
    c: &Container,
    attempt: u32,
    pause_id: &str,
    env: &[(String, String)],
    binds: Vec<String>,
) -> ContainerCreateBody {
    let lookup = |name: &str| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let expand_all =
        |v: &Option<Vec<String>>| v.as_ref().map(|v| v.iter().map(|s| expand(s, lookup)).collect::<Vec<_>>());
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let uid = sc.and_then(|s| s.run_as_user).or_else(|| pod_sc.and_then(|s| s.run_as_user));
    let gid = sc.and_then(|s| s.run_as_group).or_else(|| pod_sc.and_then(|s| s.run_as_group));
    let user = match (uid, gid) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.to_string()),
        (None, Some(g)) => Some(format!("0:{g}")),
        (None, None) => None,
    };
    let groups: Vec<String> = pod_sc
        .map(|s| {
            s.fs_group
                .into_iter()
                .chain(s.supplemental_groups.iter().flatten().copied())
                .map(|g| g.to_string())
                .collect()
        })
        .unwrap_or_default();
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    let mut cmd = expand_all(&c.args);
    let entrypoint = expand_all(&c.command);
    if entrypoint.is_some() && cmd.is_none() {
        // An explicit command drops the image's CMD, as in Kubernetes.
        cmd = Some(Vec::new());
    }
    ContainerCreateBody {
        image: c.image.clone(),
        entrypoint,
        cmd,
        env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: c.working_dir.clone().filter(|w| !w.is_empty()),
        user,
        tty: c.tty,
        open_stdin: c.stdin,
        stdin_once: c.stdin_once,
        labels: Some(labels(instance, pod, &c.name, attempt)),
        host_config: Some(HostConfig {
            network_mode: Some(format!("container:{pause_id}")),
            binds: Some(binds),
            readonly_rootfs: sc.and_then(|s| s.read_only_root_filesystem),
            privileged: sc.and_then(|s| s.privileged),
            cap_add: caps.and_then(|c| c.add.clone()),
            cap_drop: caps.and_then(|c| c.drop.clone()),
            group_add: (!groups.is_empty()).then_some(groups),
            security_opt: (sc.and_then(|s| s.allow_privilege_escalation) == Some(false))
                .then(|| vec!["no-new-privileges".to_owned()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The kubelet's check of `runAsNonRoot` (pod and container merged) before
/// it creates a container, with its messages: a uid of 0, or no uid and an
/// image whose user (`image_user`, Docker's `Config.User`) is root or not
/// numeric, is refused (CreateContainerConfigError).
pub fn verify_run_as_non_root(pod: &Pod, c: &Container, image_user: &str) -> Result<(), String> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = c.security_context.as_ref();
    let non_root = sc.and_then(|s| s.run_as_non_root).or_else(|| pod_sc.and_then(|s| s.run_as_non_root));
    if non_root != Some(true) {
        return Ok(());
    }
    let which = format!(
        "(pod: \"{}_{}({})\", container: {})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.uid.as_deref().unwrap_or_default(),
        c.name
    );
    match sc.and_then(|s| s.run_as_user).or_else(|| pod_sc.and_then(|s| s.run_as_user)) {
        Some(0) => return Err(format!("container's runAsUser breaks non-root policy {which}")),
        Some(_) => return Ok(()),
        None => {}
    }
    let user = image_user.split(':').next().unwrap_or_default();
    match user.parse::<u32>() {
        _ if user.is_empty() => Err(format!("container has runAsNonRoot and image will run as root {which}")),
        Ok(0) => Err(format!("container has runAsNonRoot and image will run as root {which}")),
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root {which}"
        )),
    }
}

/// The pod's /etc/resolv.conf: ClusterFirst (the cluster DNS and search
/// path) unless `dnsPolicy: None`, plus `dnsConfig`, as the kubelet writes
/// it. Docker's own would point at its embedded resolver, 127.0.0.11.
pub fn resolv_conf(pod: &Pod) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let d = layout::CLUSTER_DOMAIN;
    let spec = pod.spec.as_ref();
    let custom = spec.and_then(|s| s.dns_config.as_ref());
    let (mut servers, mut search, mut options) = if spec.and_then(|s| s.dns_policy.as_deref()) == Some("None") {
        (vec![], vec![], vec![])
    } else {
        (
            vec![layout::DNS_SERVICE_IP.to_string()],
            vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.to_owned()],
            vec!["ndots:5".to_owned()],
        )
    };
    if let Some(c) = custom {
        servers.extend(c.nameservers.iter().flatten().cloned());
        search.extend(c.searches.iter().flatten().cloned());
        for o in c.options.iter().flatten() {
            let opt = o.value.as_ref().map_or_else(
                || o.name.clone().unwrap_or_default(),
                |v| format!("{}:{v}", o.name.as_deref().unwrap_or_default()),
            );
            let key = opt.split(':').next().unwrap_or_default().to_owned();
            options.retain(|x| x.split(':').next() != Some(key.as_str()));
            options.push(opt);
        }
    }
    let mut out = String::new();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    for server in servers {
        out.push_str(&format!("nameserver {server}\n"));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

fn time(rfc3339: Option<&str>) -> Option<Time> {
    rfc3339.and_then(|s| s.parse::<Timestamp>().ok()).filter(|t| t.as_second() > 0).map(Time)
}

/// What the node knows about one container of the pod.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub name: String,
    pub image: String,
    pub image_id: String,
    /// Docker's view of the current instance, if one was created.
    pub current: Option<(String, ContainerState)>,
    /// Why there is no running instance (ErrImagePull, CrashLoopBackOff, ...).
    pub waiting: Option<(String, String)>,
    pub last_terminated: Option<ContainerStateTerminated>,
    pub restart_count: i32,
    pub ready: bool,
}

pub fn terminated(id: &str, s: &ContainerState) -> ContainerStateTerminated {
    let code = i32::try_from(s.exit_code.unwrap_or(0)).unwrap_or(-1);
    let reason = if s.oom_killed == Some(true) {
        "OOMKilled"
    } else if code == 0 {
        "Completed"
    } else {
        "Error"
    };
    ContainerStateTerminated {
        container_id: Some(format!("docker://{id}")),
        exit_code: code,
        reason: Some(reason.into()),
        started_at: time(s.started_at.as_deref()),
        finished_at: time(s.finished_at.as_deref()),
        message: s.error.clone().filter(|e| !e.is_empty()),
        ..Default::default()
    }
}

pub fn is_running(s: &ContainerState) -> bool {
    matches!(s.status, Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::RESTARTING))
}

pub fn has_exited(s: &ContainerState) -> bool {
    matches!(s.status, Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD))
}

pub fn container_status(o: &Observed) -> ContainerStatus {
    let state = match (&o.waiting, &o.current) {
        (Some((reason, message)), _) => K8sState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: (!message.is_empty()).then(|| message.clone()),
            }),
            ..Default::default()
        },
        (None, Some((_, s))) if is_running(s) => K8sState {
            running: Some(ContainerStateRunning { started_at: time(s.started_at.as_deref()) }),
            ..Default::default()
        },
        (None, Some((id, s))) if has_exited(s) => {
            K8sState { terminated: Some(terminated(id, s)), ..Default::default() }
        }
        _ => K8sState {
            waiting: Some(ContainerStateWaiting { reason: Some("ContainerCreating".into()), message: None }),
            ..Default::default()
        },
    };
    let running = state.running.is_some();
    ContainerStatus {
        name: o.name.clone(),
        image: o.image.clone(),
        image_id: o.image_id.clone(),
        container_id: o.current.as_ref().map(|(id, _)| format!("docker://{id}")),
        ready: o.ready && running,
        started: Some(running),
        restart_count: o.restart_count,
        last_state: o.last_terminated.clone().map(|t| K8sState { terminated: Some(t), ..Default::default() }),
        state: Some(state),
        ..Default::default()
    }
}

/// Everything the pod status is computed from.
#[derive(Debug, Default)]
pub struct PodView {
    pub pod_ip: Option<String>,
    pub host_ip: String,
    pub init: Vec<Observed>,
    pub initialized: bool,
    pub containers: Vec<Observed>,
    /// Set once the pod reached a terminal phase (Succeeded or Failed).
    pub terminal: Option<&'static str>,
}

/// The pod's status, keeping condition transition times from `previous`.
pub fn pod_status(view: &PodView, previous: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let statuses: Vec<ContainerStatus> = view.containers.iter().map(container_status).collect();
    let init_statuses: Vec<ContainerStatus> = view.init.iter().map(container_status).collect();
    let all_ready = !statuses.is_empty() && statuses.iter().all(|s| s.ready);
    let any_running = statuses.iter().any(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()));
    let all_started = view.initialized
        && statuses.iter().all(|s| s.state.as_ref().is_some_and(|st| st.waiting.is_none()) || s.restart_count > 0);
    let phase = match view.terminal {
        Some(p) => p,
        None if all_started && (any_running || statuses.iter().any(|s| s.restart_count > 0)) => "Running",
        None => "Pending",
    };
    let (ready_reason, ready) = if view.terminal.is_some() {
        (Some("PodCompleted"), false)
    } else if all_ready {
        (None, true)
    } else {
        (Some("ContainersNotReady"), false)
    };
    let old =
        |t: &str| previous.and_then(|p| p.conditions.as_ref()).and_then(|c| c.iter().find(|c| c.type_ == t)).cloned();
    let cond = |t: &str, ok: bool, reason: Option<&str>| {
        let status = if ok { "True" } else { "False" };
        let since = old(t).filter(|c| c.status == status).and_then(|c| c.last_transition_time).unwrap_or(Time(now));
        PodCondition {
            type_: t.into(),
            status: status.into(),
            reason: reason.filter(|_| !ok).map(Into::into),
            last_transition_time: Some(since),
            ..Default::default()
        }
    };
    let init_reason = (!view.initialized).then_some("ContainersNotInitialized");
    let start = previous.and_then(|p| p.start_time.clone()).unwrap_or(Time(now));
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![
            cond("PodReadyToStartContainers", view.pod_ip.is_some(), None),
            cond("Initialized", view.initialized, init_reason),
            cond("Ready", ready, ready_reason),
            cond("ContainersReady", ready, ready_reason),
            cond("PodScheduled", true, None),
        ]),
        host_ip: Some(view.host_ip.clone()),
        host_ips: Some(vec![HostIP { ip: view.host_ip.clone() }]),
        pod_ip: view.pod_ip.clone(),
        pod_ips: view.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        start_time: Some(start),
        container_statuses: Some(statuses),
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        qos_class: Some("BestEffort".into()),
        ..Default::default()
    }
}

/// The numeric port a probe names (a number, or a container port's name).
pub fn resolve_port(c: &Container, port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Capabilities, PodSpec, SecurityContext};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::collections::BTreeMap;

    fn sorted(labels: &HashMap<String, String>) -> BTreeMap<&str, &str> {
        labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("demo".into()),
                uid: Some("0123456789abcdef".into()),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            ..Default::default()
        }
    }

    #[test]
    fn pause_hostname_and_resolv_conf() {
        let body = pause_body("sb", &pod());
        assert_eq!(body.hostname.as_deref(), Some("web"));
        assert_eq!(
            resolv_conf(&pod()),
            "search demo.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
        assert_eq!(container_name("sb", &pod(), "POD", 0), "sb-demo-web-01234567-POD-0");
    }

    #[test]
    fn dns_config_and_host_aliases() {
        use k8s_openapi::api::core::v1::{HostAlias, PodDNSConfig, PodDNSConfigOption};
        let mut p = pod();
        let spec = p.spec.get_or_insert_with(Default::default);
        spec.dns_config = Some(PodDNSConfig {
            nameservers: Some(vec!["10.96.0.99".into()]),
            searches: Some(vec!["corp.example".into()]),
            options: Some(vec![PodDNSConfigOption { name: Some("ndots".into()), value: Some("2".into()) }]),
        });
        spec.host_aliases = Some(vec![HostAlias { ip: "10.1.2.3".into(), hostnames: Some(vec!["db.local".into()]) }]);
        assert_eq!(
            resolv_conf(&p),
            "search demo.svc.cluster.local svc.cluster.local cluster.local corp.example\n\
             nameserver 10.96.0.10\nnameserver 10.96.0.99\noptions ndots:2\n"
        );
        let hc = pause_body("sb", &p).host_config.expect("host config");
        assert_eq!(hc.extra_hosts, Some(vec!["db.local:10.1.2.3".into()]));
    }

    #[test]
    fn container_command_user_and_caps() {
        let c = Container {
            name: "agent".into(),
            image: Some("tpd/agent:0.1.0".into()),
            command: Some(vec!["/agent".into(), "--name=$(NAME)".into()]),
            security_context: Some(SecurityContext {
                run_as_user: Some(65532),
                read_only_root_filesystem: Some(true),
                capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let env = vec![("NAME".to_owned(), "x".to_owned())];
        let body = container_body("sb", &pod(), &c, 2, "pauseid", &env, vec!["/h:/c:ro".into()]);
        assert_eq!(body.entrypoint, Some(vec!["/agent".into(), "--name=x".into()]));
        assert_eq!(body.cmd, Some(vec![]));
        assert_eq!(body.user.as_deref(), Some("65532"));
        let hc = body.host_config.expect("host config");
        assert_eq!(hc.network_mode.as_deref(), Some("container:pauseid"));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".into()]));
        let labels = body.labels.expect("labels");
        assert_eq!(sorted(&labels)[LABEL_ATTEMPT], "2");
    }

    #[test]
    fn group_identity_and_no_new_privileges() {
        use k8s_openapi::api::core::v1::PodSecurityContext;
        let mut p = pod();
        p.spec.get_or_insert_with(Default::default).security_context = Some(PodSecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(3000),
            fs_group: Some(2000),
            supplemental_groups: Some(vec![4000]),
            ..Default::default()
        });
        let c = Container {
            name: "app".into(),
            security_context: Some(SecurityContext {
                run_as_user: Some(1001),
                allow_privilege_escalation: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let body = container_body("sb", &p, &c, 0, "pauseid", &[], vec![]);
        assert_eq!(body.user.as_deref(), Some("1001:3000"), "the container's user over the pod's");
        let hc = body.host_config.expect("host config");
        assert_eq!(hc.group_add, Some(vec!["2000".into(), "4000".into()]));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".into()]));
    }

    #[test]
    fn run_as_non_root_is_checked_as_the_kubelet_does() {
        use k8s_openapi::api::core::v1::PodSecurityContext;
        let ctr = |user: Option<i64>, non_root: Option<bool>| Container {
            name: "app".into(),
            security_context: Some(SecurityContext {
                run_as_user: user,
                run_as_non_root: non_root,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut non_root_pod = pod();
        non_root_pod.spec.get_or_insert_with(Default::default).security_context =
            Some(PodSecurityContext { run_as_non_root: Some(true), ..Default::default() });
        // (what, pod, container, image user, Ok or the error's start)
        type Row<'a> = (&'a str, &'a Pod, Container, &'a str, Result<(), &'a str>);
        let table: [Row; 8] = [
            ("not asked", &pod(), ctr(None, None), "", Ok(())),
            ("asked, a uid", &pod(), ctr(Some(1000), Some(true)), "", Ok(())),
            ("asked, uid 0", &pod(), ctr(Some(0), Some(true)), "", Err("container's runAsUser breaks non-root policy")),
            (
                "the pod asks, root image",
                &non_root_pod,
                ctr(None, None),
                "",
                Err("container has runAsNonRoot and image will run as root"),
            ),
            (
                "the pod asks, image 0:0",
                &non_root_pod,
                ctr(None, None),
                "0:0",
                Err("container has runAsNonRoot and image will run as root"),
            ),
            ("the pod asks, image nonroot", &non_root_pod, ctr(None, None), "65532:65532", Ok(())),
            (
                "the pod asks, named image user",
                &non_root_pod,
                ctr(None, None),
                "app",
                Err("container has runAsNonRoot and image has non-numeric user (app)"),
            ),
            ("the container says no", &non_root_pod, ctr(None, Some(false)), "", Ok(())),
        ];
        for (what, p, c, image_user, want) in table {
            let got = verify_run_as_non_root(p, &c, image_user);
            match (got, want) {
                (Ok(()), Ok(())) => {}
                (Err(e), Err(start)) => assert!(e.starts_with(start) && e.contains("container: app"), "{what}: {e}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn status_phases_and_conditions() {
        let running = ContainerState {
            status: Some(ContainerStateStatusEnum::RUNNING),
            started_at: Some("2026-01-01T00:00:00Z".into()),
            ..Default::default()
        };
        let mut view = PodView {
            pod_ip: Some("10.100.0.3".into()),
            host_ip: "172.17.0.1".into(),
            initialized: true,
            containers: vec![Observed {
                name: "app".into(),
                current: Some(("abc".into(), running)),
                ready: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let now = Timestamp::now();
        let st = pod_status(&view, None, now);
        assert_eq!(st.phase.as_deref(), Some("Running"));
        let ready = st.conditions.as_ref().expect("conds").iter().find(|c| c.type_ == "Ready").expect("ready").clone();
        assert_eq!(ready.status, "True");
        let cs = &st.container_statuses.as_ref().expect("cs")[0];
        assert_eq!(cs.container_id.as_deref(), Some("docker://abc"));
        assert!(cs.ready);

        view.containers[0].current = None;
        view.containers[0].waiting = Some(("ErrImagePull".into(), "no image".into()));
        let later = pod_status(&view, Some(&st), now);
        assert_eq!(later.phase.as_deref(), Some("Pending"));
        let cs = &later.container_statuses.as_ref().expect("cs")[0];
        assert_eq!(
            cs.state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref()),
            Some("ErrImagePull")
        );
        let scheduled =
            |s: &PodStatus| s.conditions.as_ref().and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled").cloned());
        assert_eq!(
            scheduled(&later).and_then(|c| c.last_transition_time),
            scheduled(&st).and_then(|c| c.last_transition_time)
        );
    }
}
