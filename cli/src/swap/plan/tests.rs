use super::*;
use crate::swap::record::Record;
use k8s_openapi::api::core::v1::{Capabilities, PodSecurityContext, SeccompProfile, SecurityContext};

fn fixture(name: &str) -> Deployment {
    let path = format!("{}/src/swap/testdata/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn params() -> Params {
    Params {
        agent_image: "tpd/agent:0.1.0".into(),
        session: "s-1234".into(),
        holder: "ana@laptop".into(),
        now: "2026-11-22T03:30:00Z".parse().unwrap(),
        lease_seconds: 15,
        extra_ports: vec![],
    }
}

fn pod(d: &Deployment) -> &k8s_openapi::api::core::v1::PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn env_of<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

#[test]
fn targets_parse_like_kubectl() {
    let t = |s: &str| s.parse::<Target>().map_err(|e| e.to_string());
    let ok = |name: &str, c: Option<&str>| Ok(Target { name: name.into(), container: c.map(Into::into) });
    assert_eq!(t("deployment/hello"), ok("hello", None));
    assert_eq!(t("deploy/hello:web"), ok("hello", Some("web")));
    assert_eq!(t("deployments.apps/hello"), ok("hello", None));
    for bad in ["hello", "pod/hello", "deployment/", "deployment/a/b", "deployment/hello:"] {
        assert!(t(bad).unwrap_err().contains("deployment/NAME"), "{bad}");
    }
}

#[test]
fn container_choice() {
    // (fixture, wanted, expected index or error text)
    let table: [(&str, Option<&str>, Result<usize, &str>); 6] = [
        ("hello", None, Ok(0)),
        ("shop", None, Ok(0)), // named like the Deployment
        ("shop", Some("proxy"), Ok(1)),
        (
            "pair",
            None,
            Err(
                "has 2 containers (api, worker) and none is named like the Deployment; pick one with deployment/pair:CONTAINER",
            ),
        ),
        ("pair", Some("nope"), Err("deployment/pair has no container named \"nope\" (it has: api, worker)")),
        ("pair", Some("worker"), Ok(1)),
    ];
    for (name, wanted, want) in table {
        let got = choose_container(&fixture(name), wanted).map_err(|e| e.to_string());
        match (got, want) {
            (Ok(i), Ok(j)) => assert_eq!(i, j, "{name} {wanted:?}"),
            (Err(e), Err(text)) => assert!(e.contains(text), "{name} {wanted:?}: {e}"),
            (got, want) => panic!("{name} {wanted:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn the_service_account_token_is_served_unless_the_pod_opts_out() {
    fn pod_mut(d: &mut Deployment) -> &mut k8s_openapi::api::core::v1::PodSpec {
        d.spec.as_mut().and_then(|s| s.template.spec.as_mut()).expect("a pod template")
    }
    let sa = |d: &Deployment| {
        plan(d, None, &params()).expect("plans").mounts.iter().filter(|m| m.mount_path == SERVICE_ACCOUNT_DIR).count()
    };
    let mut d = fixture("hello");
    assert_eq!(sa(&d), 1, "admission mounts it in the pod, so the agent serves it");
    pod_mut(&mut d).automount_service_account_token = Some(false);
    assert_eq!(sa(&d), 0, "the pod opted out");
    let mut d = fixture("hello");
    let c = &mut pod_mut(&mut d).containers[0];
    let own = k8s_openapi::api::core::v1::VolumeMount {
        name: "token".into(),
        mount_path: SERVICE_ACCOUNT_DIR.into(),
        ..Default::default()
    };
    c.volume_mounts.get_or_insert_with(Vec::new).push(own);
    let swap = plan(&d, None, &params()).expect("plans");
    let at_sa: Vec<&str> =
        swap.mounts.iter().filter(|m| m.mount_path == SERVICE_ACCOUNT_DIR).map(|m| m.name.as_str()).collect();
    assert_eq!(at_sa, ["token"], "the container's own mount there is served, not a second one");
}

#[test]
fn the_agent_takes_the_containers_place() {
    let original = fixture("shop");
    let swap = plan(&original, None, &Params { extra_ports: vec![8080, 3000], ..params() }).unwrap();
    let (before, after) = (pod(&original), pod(&swap.deployment));
    let (orig, agent) = (&before.containers[0], &after.containers[0]);

    assert_eq!(agent.name, "shop");
    assert_eq!(agent.image.as_deref(), Some("tpd/agent:0.1.0"));
    // What the pod's environment and volumes are made of stays.
    assert_eq!(agent.env_from, orig.env_from);
    assert_eq!(agent.env.as_ref().unwrap()[..3], orig.env.as_ref().unwrap()[..]);
    assert_eq!(
        (&agent.volume_mounts, &agent.ports, &agent.resources, &agent.working_dir),
        (&orig.volume_mounts, &orig.ports, &orig.resources, &orig.working_dir)
    );
    // The agent is told its ports, session and mounts.
    assert_eq!(env_of(agent, agent_env::PORTS), Some("3000,7946,8080,9090"));
    assert_eq!(env_of(agent, agent_env::SESSION), Some("s-1234"));
    let mounts = tpd_wire::files::parse_mounts(env_of(agent, agent_env::MOUNTS).unwrap()).unwrap();
    assert_eq!(mounts, swap.mounts);
    let served = [("/work", false), ("/etc/shop", true), ("/etc/ssl/shop.pem", true), (SERVICE_ACCOUNT_DIR, true)];
    assert_eq!(mounts.iter().map(|m| (m.mount_path.as_str(), m.read_only)).collect::<Vec<_>>(), served);
    // The app's command, probes and hooks would fail against the agent.
    assert_eq!(
        (&agent.command, &agent.args, &agent.lifecycle, &agent.liveness_probe, &agent.startup_probe),
        (&None, &None, &None, &None, &None)
    );
    let ready = agent.readiness_probe.as_ref().unwrap().tcp_socket.as_ref().unwrap();
    assert_eq!(ready.port, IntOrString::Int(7700));
    // The container's user (1000, with the pod's fsGroup 2000, which stays
    // on the pod); read-only, never escalating, no capabilities (a non-root
    // process has none to use, NET_BIND_SERVICE included).
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(
        (sc.run_as_non_root, sc.run_as_user, sc.read_only_root_filesystem, sc.allow_privilege_escalation),
        (None, Some(1000), Some(true), Some(false))
    );
    assert_eq!(sc.capabilities, Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None }));
    assert_eq!(after.security_context, before.security_context);
    // The rest of the pod is untouched.
    assert_eq!(after.containers[1], before.containers[1]);
    assert_eq!(
        (&after.init_containers, &after.volumes, &after.service_account_name),
        (&before.init_containers, &before.volumes, &before.service_account_name)
    );
    let spec = swap.deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.as_ref().unwrap().type_.as_deref(), Some("Recreate"));
    assert_eq!(spec.selector, original.spec.as_ref().unwrap().selector);
    let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(
        (labels.get("app").map(String::as_str), labels.get(names::LABEL_SESSION).map(String::as_str)),
        (Some("shop"), Some("s-1234"))
    );
    assert_eq!(swap.deployment.metadata.labels, original.metadata.labels);
    // The record on the Deployment is the one returned.
    assert_eq!(Record::read(&swap.deployment).unwrap(), Some(swap.record.clone()));
    assert_eq!(swap.record.original.replicas, Some(3));
}

#[test]
fn restore_of_plan_is_the_original() {
    for (name, container) in [("hello", None), ("shop", None), ("shop", Some("proxy")), ("pair", Some("worker"))] {
        let original = fixture(name);
        let swap = plan(&original, container, &params()).unwrap();
        assert_ne!(swap.deployment, original);
        let record = Record::read(&swap.deployment).unwrap().unwrap();
        assert_eq!(restore(&swap.deployment, &record).unwrap(), original, "{name} {container:?}");
    }
}

#[test]
fn patches_carry_exactly_the_planned_change() {
    let original = fixture("shop");
    let swap = plan(&original, None, &params()).unwrap();
    let mut doc = serde_json::to_value(&original).unwrap();
    let to_swap = patch_between(&original, &swap.deployment, Guard::Generation);
    json_patch::patch(&mut doc, &to_swap).unwrap();
    assert_eq!(doc, serde_json::to_value(&swap.deployment).unwrap());

    let restored = restore(&swap.deployment, &swap.record).unwrap();
    let back = patch_between(&swap.deployment, &restored, Guard::Record);
    json_patch::patch(&mut doc, &back).unwrap();
    assert_eq!(doc, serde_json::to_value(&original).unwrap());

    // A record that changed meanwhile (another session took over) makes the
    // restore patch fail instead of overwriting it.
    let mut taken = serde_json::to_value(&swap.deployment).unwrap();
    taken["metadata"]["annotations"][names::ANNOTATION_SWAP] = "{\"session\":\"other\"}".into();
    assert!(json_patch::patch(&mut taken, &back).is_err());
}

#[test]
fn the_swap_patch_outlasts_status_writes_but_not_a_spec_change() {
    let mut original = fixture("shop");
    original.metadata.generation = Some(4);
    original.metadata.resource_version = Some("100".into());
    let swap = plan(&original, None, &params()).unwrap();
    let to_swap = patch_between(&original, &swap.deployment, Guard::Generation);

    // What the deployment controller writes during and after a rollout.
    let mut written = serde_json::to_value(&original).unwrap();
    written["metadata"]["resourceVersion"] = "101".into();
    written["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "9".into();
    written["status"] = serde_json::json!({"observedGeneration": 4, "replicas": 2});
    json_patch::patch(&mut written, &to_swap).expect("status writes do not stop the swap");
    assert_eq!(written["status"]["replicas"], 2, "the patch leaves status alone");

    // Someone else changed the spec: the swap must not overwrite it.
    let mut edited = serde_json::to_value(&original).unwrap();
    edited["metadata"]["generation"] = 5.into();
    assert!(json_patch::patch(&mut edited, &to_swap).is_err());
}

#[test]
fn the_agents_tunnel_port_cannot_be_taken() {
    let err = plan(&fixture("pair"), Some("api"), &params()).unwrap_err().to_string();
    assert!(err.contains("uses port 7700"), "{err}");
}

#[test]
fn a_restore_after_someone_renamed_the_container_says_so() {
    let swap = plan(&fixture("hello"), None, &params()).unwrap();
    let mut edited = swap.deployment.clone();
    edited.spec.as_mut().unwrap().template.spec.as_mut().unwrap().containers[0].name = "renamed".into();
    assert!(matches!(restore(&edited, &swap.record), Err(Error::ContainerGone(..))));
}

#[test]
fn an_agent_without_ports_gets_no_port_variable() {
    // The outbound-only agent pod: the agent would read "" as one empty port.
    let agent = agent_container(&Container { name: "agent".into(), ..Default::default() }, None, &params(), &[], &[]);
    assert_eq!(env_of(&agent, agent_env::PORTS), None);
    assert_eq!(env_of(&agent, agent_env::SESSION), Some("s-1234"));
}

/// The agent's identity from the container's and the pod's securityContext,
/// merged as the kubelet does.
#[test]
fn the_agent_runs_as_the_container_it_replaces() {
    fn pod(user: Option<i64>, group: Option<i64>, non_root: Option<bool>) -> Option<PodSecurityContext> {
        let sc = PodSecurityContext { fs_group: Some(2000), ..Default::default() };
        Some(PodSecurityContext { run_as_user: user, run_as_group: group, run_as_non_root: non_root, ..sc })
    }
    fn ctr(user: Option<i64>, group: Option<i64>, non_root: Option<bool>) -> Option<SecurityContext> {
        let sc = SecurityContext::default();
        Some(SecurityContext { run_as_user: user, run_as_group: group, run_as_non_root: non_root, ..sc })
    }
    type Row = (&'static str, Option<PodSecurityContext>, Option<SecurityContext>, (i64, Option<i64>, Option<bool>));
    // (what, pod, container, want (runAsUser, runAsGroup, runAsNonRoot))
    let table: [Row; 10] = [
        ("no securityContext: root, as the image ran", None, None, (0, None, None)),
        ("empty ones: the same", Some(Default::default()), Some(Default::default()), (0, None, None)),
        ("the pod's user and group", pod(Some(1000), Some(3000), None), None, (1000, Some(3000), None)),
        (
            "the container's over the pod's",
            pod(Some(1000), Some(3000), None),
            ctr(Some(7), None, None),
            (7, Some(3000), None),
        ),
        ("a group only: root in it", pod(None, Some(3000), None), None, (0, Some(3000), None)),
        ("non-root, no uid: the agent's", pod(None, None, Some(true)), None, (65532, Some(65532), Some(true))),
        ("non-root, no uid, a group", None, ctr(None, Some(3000), Some(true)), (65532, Some(3000), Some(true))),
        ("non-root with a uid", pod(Some(1000), None, Some(true)), None, (1000, None, Some(true))),
        (
            "the container's runAsNonRoot over the pod's",
            pod(None, None, Some(true)),
            ctr(None, None, Some(false)),
            (0, None, Some(false)),
        ),
        ("explicit root", None, ctr(Some(0), Some(0), None), (0, Some(0), None)),
    ];
    for (what, pod_sc, c, (user, group, non_root)) in table {
        let sc = agent_security_context(pod_sc.as_ref(), c.as_ref());
        assert_eq!((sc.run_as_user, sc.run_as_group, sc.run_as_non_root), (Some(user), group, non_root), "{what}");
        // Whatever the original, the agent never escalates nor writes its root.
        assert_eq!(
            (sc.allow_privilege_escalation, sc.read_only_root_filesystem, sc.privileged),
            (Some(false), Some(true), None),
            "{what}"
        );
        let drop = sc.capabilities.and_then(|c| c.drop);
        assert_eq!(drop, Some(vec!["ALL".to_owned()]), "{what}");
    }
}

/// A root agent keeps, of the capabilities a root container had, only those
/// for files and low ports; a non-root one gets none.
#[test]
fn the_agent_keeps_no_capability_the_container_lacked() {
    fn caps(add: &[&str], drop: &[&str]) -> Option<SecurityContext> {
        let list = |l: &[&str]| (!l.is_empty()).then(|| l.iter().map(|s| (*s).to_owned()).collect());
        let caps = Some(Capabilities { add: list(add), drop: list(drop) });
        Some(SecurityContext { capabilities: caps, ..Default::default() })
    }
    const ALL_OURS: &[&str] = &["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "NET_BIND_SERVICE"];
    let privileged = Some(SecurityContext { privileged: Some(true), ..Default::default() });
    let non_root = Some(SecurityContext { run_as_user: Some(1000), ..privileged.clone().unwrap() });
    // (what, container, capabilities the agent adds after dropping ALL)
    let table: [(&str, Option<SecurityContext>, &[&str]); 8] = [
        ("root with the runtime's defaults", None, ALL_OURS),
        ("all dropped", caps(&[], &["ALL"]), &[]),
        ("all dropped, one added", caps(&["NET_BIND_SERVICE"], &["ALL"]), &["NET_BIND_SERVICE"]),
        (
            "some dropped (with and without CAP_)",
            caps(&[], &["CAP_DAC_OVERRIDE", "chown"]),
            &["FOWNER", "FSETID", "NET_BIND_SERVICE"],
        ),
        (
            "ALL added, one dropped",
            caps(&["ALL"], &["FSETID"]),
            &["CHOWN", "DAC_OVERRIDE", "FOWNER", "NET_BIND_SERVICE"],
        ),
        ("added beyond the defaults: not ours to keep", caps(&["SYS_ADMIN", "NET_ADMIN"], &["ALL"]), &[]),
        ("privileged: only the file and port ones", privileged, ALL_OURS),
        ("non-root, privileged even: none", non_root, &[]),
    ];
    for (what, c, add) in table {
        let sc = agent_security_context(None, c.as_ref());
        let want_add = (!add.is_empty()).then(|| add.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(sc.capabilities, Some(Capabilities { drop: Some(vec!["ALL".into()]), add: want_add }), "{what}");
        assert_eq!(sc.privileged, None, "{what}");
    }
}

/// A container that passes Pod Security `restricted` is replaced by an agent
/// that passes it too: non-root, no escalation, all capabilities dropped
/// (NET_BIND_SERVICE alone may be added), seccomp RuntimeDefault or
/// Localhost, its own or the pod's.
#[test]
fn a_restricted_container_gets_a_restricted_agent() {
    let runtime_default = || Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None });
    let localhost =
        || Some(SeccompProfile { type_: "Localhost".into(), localhost_profile: Some("profiles/app.json".into()) });
    let restricted = SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: Some(vec!["NET_BIND_SERVICE".into()]) }),
        ..Default::default()
    };
    let pod_level = PodSecurityContext { seccomp_profile: runtime_default(), ..Default::default() };
    // (what, pod, container's seccomp, the agent's own seccomp)
    let table = [
        ("the pod's seccomp, inherited", Some(&pod_level), None, None),
        ("the container's own", None, localhost(), localhost()),
        ("none anywhere: RuntimeDefault", None, None, runtime_default()),
    ];
    for (what, pod_sc, seccomp, want) in table {
        let c = SecurityContext { seccomp_profile: seccomp, ..restricted.clone() };
        let sc = agent_security_context(pod_sc, Some(&c));
        assert_eq!(sc.seccomp_profile, want, "{what}");
        assert_eq!((sc.run_as_non_root, sc.run_as_user), (Some(true), Some(1000)), "{what}");
        let caps = sc.capabilities.unwrap();
        assert_eq!((caps.drop, caps.add), (Some(vec!["ALL".to_owned()]), None), "{what}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{what}");
    }
}

#[test]
fn the_outbound_agent_pod_runs_as_the_agents_own_non_root_user() {
    let pod = crate::session::outbound_agent_pod("default", &params());
    let sc = pod.spec.unwrap().containers[0].security_context.clone().unwrap();
    assert_eq!((sc.run_as_non_root, sc.run_as_user, sc.run_as_group), (Some(true), Some(65532), Some(65532)));
    assert_eq!(sc.capabilities.unwrap().add, None);
}

/// The ports the pod's other containers declare reach the developer's
/// container, with who declares them; the swapped container's own ports
/// (here also declared by envoy and statsd) and SCTP do not, nor an
/// ordinary init container's, which has exited by the time the app runs.
#[test]
fn the_pods_other_containers_ports_are_its_neighbours() {
    let d = fixture("neighbours");
    let p = Params { extra_ports: vec![15000], ..params() };
    let swap = plan(&d, Some("shop"), &p).unwrap();
    let got: Vec<String> = swap.neighbours.iter().map(|n| format!("{} {}", n.port, n.owner)).collect();
    assert_eq!(got, ["6379 container cache", "6379/udp container cache", "8125/udp container statsd"]);
    // Swapping the cache instead: the app's ports and envoy's are neighbours.
    let swap = plan(&d, Some("cache"), &params()).unwrap();
    let got: Vec<String> = swap.neighbours.iter().map(|n| format!("{} {}", n.port, n.owner)).collect();
    assert_eq!(
        got,
        ["8080 container shop", "9090 container shop", "8125/udp container statsd", "15000 container envoy"]
    );
}
