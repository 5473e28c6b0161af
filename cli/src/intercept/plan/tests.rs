use super::*;
use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile, SecurityContext, ServicePort};

fn fixture(name: &str) -> Deployment {
    let path = format!("{}/src/swap/testdata/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn service(name: &str, selector: &[(&str, &str)], ports: serde_json::Value) -> Service {
    let selector: BTreeMap<&str, &str> = selector.iter().copied().collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "store", "resourceVersion": "5"},
        "spec": {"selector": selector, "ports": ports},
    }))
    .unwrap()
}

fn target(svc: &Service, index: usize) -> Option<IntOrString> {
    svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[index].target_port.clone()
}

fn named(s: &str) -> Option<IntOrString> {
    Some(IntOrString::String(s.into()))
}

fn shop_services() -> Vec<Service> {
    vec![
        service(
            "shop",
            &[("app", "shop")],
            serde_json::json!([
                {"name": "web", "port": 80, "targetPort": "http"},
                {"name": "metrics", "port": 9090, "targetPort": 9090},
            ]),
        ),
        service("shop-direct", &[("app", "shop"), ("tier", "web")], serde_json::json!([{"port": 8080}])),
        service("shop-numeric", &[("tier", "web")], serde_json::json!([{"port": 81, "targetPort": 8080}])),
        service("shop-udp", &[("app", "shop")], serde_json::json!([{"port": 8080, "protocol": "UDP"}])),
        service("other", &[("app", "other")], serde_json::json!([{"port": 8080}])),
        service("shop-canary", &[("app", "shop"), ("track", "canary")], serde_json::json!([{"port": 8080}])),
        service("external", &[], serde_json::json!([{"port": 8080}])),
    ]
}

fn agent(d: &Deployment) -> &Container {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.containers.iter().find(|c| c.name == AGENT_CONTAINER).expect("the agent container")
}

fn env_of<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.as_deref())
}

#[test]
fn services_that_reach_the_intercepted_port_are_pointed_at_the_agent() {
    let services = shop_services();
    let planned = plan(&fixture("shop"), &services, None, "tpd/agent:1", &[8080]).unwrap();
    let by_name: BTreeMap<String, &Service> =
        planned.services.iter().map(|s| (s.metadata.name.clone().unwrap(), s)).collect();
    // (service, port index, targetPort after the plan; None: the Service is untouched)
    let table: [(&str, usize, Option<Option<IntOrString>>); 7] = [
        ("shop", 0, Some(named("tpd-8080"))),         // by the real container's port name
        ("shop-direct", 0, Some(named("tpd-8080"))),  // no targetPort: the port's own number
        ("shop-numeric", 0, Some(named("tpd-8080"))), // by number
        ("shop-udp", 0, None),                        // UDP is not intercepted
        ("other", 0, None),                           // selects other pods
        ("shop-canary", 0, None),                     // asks for a label the pods lack
        ("external", 0, None),                        // no selector
    ];
    for (name, index, want) in table {
        match (by_name.get(name), want) {
            (Some(svc), Some(want)) => assert_eq!(target(svc, index), want, "{name}"),
            (None, None) => {}
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
    // The metrics port of "shop" is not intercepted and stays as it was.
    assert_eq!(target(by_name["shop"], 1), Some(IntOrString::Int(9090)));
    let shop = &planned.record.services["shop"];
    assert_eq!(
        shop,
        &vec![OriginalTarget { index: 0, name: Some("web".into()), target_port: named("http"), remote: 8080 }]
    );
    assert_eq!(planned.record.services["shop-direct"][0].target_port, None);
    assert_eq!(planned.record.services.len(), 3);
}

#[test]
fn the_agent_joins_the_pod_with_ports_of_its_own() {
    let original = fixture("shop");
    let planned = plan(&original, &shop_services(), None, "tpd/agent:1", &[8080, 9090]).unwrap();
    let pod = planned.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let orig_pod = original.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), orig_pod.containers.len() + 1, "added beside, nothing replaced");
    assert_eq!(pod.containers[..orig_pod.containers.len()], orig_pod.containers[..]);
    assert_eq!(planned.deployment.spec.as_ref().unwrap().replicas, Some(3), "replicas untouched");
    let a = agent(&planned.deployment);
    assert_eq!(a.image.as_deref(), Some("tpd/agent:1"));
    let config: Config = serde_json::from_str(env_of(a, agent_env::INTERCEPT).unwrap()).unwrap();
    assert_eq!(config, planned.record.config);
    assert_eq!(
        config,
        Config {
            transport: 7700,
            intercept: 7701,
            ports: vec![PortMap { remote: 8080, listen: 7702 }, PortMap { remote: 9090, listen: 7703 }],
        }
    );
    let ports: Vec<(String, i32)> =
        a.ports.iter().flatten().map(|p| (p.name.clone().unwrap(), p.container_port)).collect();
    let want = [("tpd-transport", 7700), ("tpd-intercept", 7701), ("tpd-8080", 7702), ("tpd-9090", 7703)];
    assert_eq!(ports, want.map(|(n, p)| (n.to_owned(), p)));
    // The real container's env and volumes, for the session; no swap variables.
    let shop = &orig_pod.containers[0];
    assert_eq!(env_of(a, "MODE"), Some("prod"));
    assert_eq!(a.env_from, shop.env_from);
    assert_eq!(a.volume_mounts, shop.volume_mounts);
    assert!(env_of(a, agent_env::MOUNTS).is_some());
    assert_eq!(env_of(a, agent_env::PORTS), None);
    assert_eq!(env_of(a, agent_env::SESSION), None);
    let probe = a.readiness_probe.as_ref().unwrap();
    assert_eq!(probe.tcp_socket.as_ref().unwrap().port, IntOrString::Int(7700));
    assert_eq!(probe.period_seconds, Some(1));
    let annotation = planned.deployment.metadata.annotations.as_ref().unwrap().get(ANNOTATION).unwrap();
    assert_eq!(Record::read(&planned.deployment).unwrap().as_ref(), Some(&planned.record));
    assert!(annotation.contains("\"container\":\"shop\""));
}

#[test]
fn the_agents_ports_skip_every_port_the_pod_declares() {
    let mut d = fixture("shop");
    let pod = d.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    let port = |n: i32| ContainerPort { container_port: n, ..Default::default() };
    pod.containers[1].ports.get_or_insert_with(Vec::new).push(port(7700));
    pod.init_containers.as_mut().unwrap()[0].ports = Some(vec![port(7702), port(7703)]);
    // (ports wanted, expected)
    let table: [(usize, &[u16]); 3] = [(1, &[7701]), (2, &[7701, 7704]), (3, &[7701, 7704, 7705])];
    for (n, want) in table {
        assert_eq!(pick_ports(d.spec.as_ref().unwrap().template.spec.as_ref().unwrap(), n), want, "{n}");
    }
    let planned = plan(&d, &[], None, "a", &[8080]).unwrap();
    assert_eq!(
        planned.record.config,
        Config { transport: 7701, intercept: 7704, ports: vec![PortMap { remote: 8080, listen: 7705 }] }
    );
}

#[test]
fn the_agent_runs_as_the_real_container_with_no_more_privilege() {
    let agent_sc = |d: &Deployment| {
        let planned = plan(d, &[], None, "a", &[8080]).unwrap();
        agent(&planned.deployment).security_context.clone().unwrap()
    };
    let drop_all = |add: Option<Vec<String>>| Some(Capabilities { drop: Some(vec!["ALL".into()]), add });
    // The shop container runs as 1000 with NET_BIND_SERVICE: the agent as
    // 1000, and a non-root process has no capabilities to keep.
    let sc = agent_sc(&fixture("shop"));
    assert_eq!((sc.run_as_user, sc.capabilities.clone()), (Some(1000), drop_all(None)));
    assert_eq!((sc.allow_privilege_escalation, sc.read_only_root_filesystem), (Some(false), Some(true)));
    assert_eq!(sc.seccomp_profile.map(|s| s.type_).as_deref(), Some("RuntimeDefault"));
    assert_eq!(sc.privileged, None);
    // A root container (its image's default user): the agent is root too,
    // with only the file capabilities the container had, so it writes the
    // volumes' files as the app did.
    let mut root = fixture("shop");
    let pod = root.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    pod.containers[0].security_context = None;
    let sc = agent_sc(&root);
    assert_eq!(sc.run_as_user, Some(0));
    let caps = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "NET_BIND_SERVICE"].map(String::from).to_vec();
    assert_eq!(sc.capabilities, drop_all(Some(caps)));
    // An app that Pod Security `restricted` admits: so is the agent.
    let pod = root.spec.as_mut().unwrap().template.spec.as_mut().unwrap();
    pod.containers[0].security_context = Some(SecurityContext {
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: drop_all(None),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    });
    let sc = agent_sc(&root);
    assert_eq!((sc.run_as_non_root, sc.run_as_user), (Some(true), Some(65532)));
    assert_eq!((sc.capabilities, sc.allow_privilege_escalation), (drop_all(None), Some(false)));
}

#[test]
fn restore_of_plan_is_the_original() {
    let original = fixture("shop");
    let services = shop_services();
    let planned = plan(&original, &services, None, "a", &[8080]).unwrap();
    let mut intercepted = planned.deployment.clone();
    let entry = super::super::record::entry_key("s-1");
    intercepted.metadata.annotations.as_mut().unwrap().insert(entry, "{}".into());
    assert_eq!(restore_deployment(&intercepted), original);
    for changed in &planned.services {
        let name = changed.metadata.name.clone().unwrap();
        let before = services.iter().find(|s| s.metadata.name.as_deref() == Some(&name)).unwrap();
        assert_eq!(&restore_service(changed, &planned.record.services[&name]), before, "{name}");
    }
    // A Deployment with no other annotation gets none back either.
    let mut bare = fixture("hello");
    bare.metadata.annotations = None;
    let planned = plan(&bare, &[], None, "a", &[8080]).unwrap();
    assert_eq!(restore_deployment(&planned.deployment), bare);
}

#[test]
fn a_port_changed_by_someone_else_since_is_left_alone() {
    let services = shop_services();
    let planned = plan(&fixture("shop"), &services, None, "a", &[8080]).unwrap();
    let mut changed = planned.services.iter().find(|s| s.metadata.name.as_deref() == Some("shop")).unwrap().clone();
    let ports: &mut Vec<ServicePort> = changed.spec.as_mut().unwrap().ports.as_mut().unwrap();
    ports[0].target_port = Some(IntOrString::Int(8443));
    let restored = restore_service(&changed, &planned.record.services["shop"]);
    assert_eq!(target(&restored, 0), Some(IntOrString::Int(8443)));
}

#[test]
fn only_declared_tcp_ports_can_be_intercepted() {
    let d = fixture("shop");
    // (remotes, error text; None: planned)
    let table: [(&[u16], Option<&str>); 4] = [
        (&[8080], None),
        (&[8080, 9090], None),
        (
            &[7946],
            Some(
                "does not declare TCP port 7946 (it declares: 8080/TCP (http), 9090/TCP (metrics), 7946/UDP (gossip))",
            ),
        ),
        (&[8081], Some("container \"shop\" of deployment/shop does not declare TCP port 8081")),
    ];
    for (remotes, want) in table {
        let got = plan(&d, &[], None, "a", remotes).map(drop).map_err(|e| e.to_string());
        match (got, want) {
            (Ok(()), None) => {}
            (Err(e), Some(text)) => assert!(e.contains(text), "{remotes:?}: {e}"),
            (got, want) => panic!("{remotes:?}: got {got:?}, want {want:?}"),
        }
    }
    let err = plan(&fixture("pair"), &[], None, "a", &[8080]).unwrap_err().to_string();
    assert!(err.contains("pick one with deployment/pair:CONTAINER"), "{err}");
}

#[test]
fn the_session_sees_the_real_containers_volumes_and_neighbours() {
    let original = fixture("shop");
    let planned = plan(&original, &[], None, "a", &[8080]).unwrap();
    let (mounts, neighbours) = served(&planned.deployment, "shop");
    let (swap_mounts, swap_neighbours) = {
        let swap = crate::swap::plan::plan(
            &original,
            None,
            &crate::swap::plan::Params {
                agent_image: "a".into(),
                session: "s".into(),
                holder: "h".into(),
                now: "2026-12-07T10:00:00Z".parse().unwrap(),
                lease_seconds: 15,
                extra_ports: vec![],
            },
        )
        .unwrap();
        (swap.mounts, swap.neighbours)
    };
    assert_eq!(mounts, swap_mounts);
    assert_eq!(neighbours, swap_neighbours, "the agent's own ports are not neighbours");
    assert_eq!(selector(&original).unwrap(), "app=shop");
}

#[test]
fn a_session_is_refused_the_requests_a_live_session_takes() {
    use crate::intercept::record::Entry;
    use tpd_wire::intercept::Filter;
    let target: Target = "deployment/api".parse().unwrap();
    let now: k8s_openapi::jiff::Timestamp = "2026-12-07T10:02:00Z".parse().unwrap();
    let dev = |v: &str| Filter {
        headers: [("x-dev".to_owned(), v.to_owned())].into(),
        path_prefix: None,
        ..Filter::default()
    };
    let alice = Entry::new("s-a", "alice@laptop", now, &[8080], &dev("alice"));
    let live = [alice.clone(), Entry::new("s-b", "bob@desk", now, &[8080, 9090], &dev("bob"))];
    // (ports, filter, refusal)
    let table: [(&[u16], Filter, Option<&str>); 5] = [
        (&[8080], dev("carol"), None),
        (&[9090], dev("alice"), None),
        (&[8080], Filter { path_prefix: Some("/api".into()), ..dev("alice") }, None),
        (
            &[8080],
            dev("alice"),
            Some("deployment/api port 8080 x-dev=alice is intercepted by alice@laptop since 10:02 UTC"),
        ),
        (
            &[7000, 9090],
            dev("bob"),
            Some("deployment/api port 9090 x-dev=bob is intercepted by bob@desk since 10:02 UTC"),
        ),
    ];
    for (ports, filter, want) in table {
        let mine = Entry::new("s-new", "dan@box", now, ports, &filter);
        let got = clash(&target, &live, &mine);
        assert_eq!(got.as_ref().map(|h| h.message.as_str()), want, "{ports:?} {filter}");
        if let Some(h) = got {
            assert_eq!(h.help, "pick another --header value, or wait for that session to end");
        }
    }
    // A session never clashes with itself (its entry, read back).
    assert!(clash(&target, &live, &alice).is_none());
    // Copies of alice's requests take nothing from her; two mirrors of
    // every request each get their own.
    let mirror = Some(tpd_wire::intercept::Mirror { body_limit: 1 << 20 });
    let copies = Entry::new("s-m", "erin@box", now, &[8080], &dev("alice")).mirroring(mirror);
    assert!(clash(&target, &live, &copies).is_none());
    let every = |s: &str| Entry::new(s, "erin@box", now, &[8080], &Filter::default()).mirroring(mirror);
    assert!(clash(&target, &[every("s-m1")], &every("s-m2")).is_none());
}

#[test]
fn a_later_session_joins_only_what_the_agents_already_do() {
    let planned = plan(&fixture("shop"), &[], None, "a", &[8080]).unwrap();
    let r = &planned.record;
    assert!(joinable("shop", r, "shop", &[8080]).is_ok());
    let err = joinable("shop", r, "shop", &[9090]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "deployment/shop is intercepted on port(s) 8080 only, and port 9090 would need its agents set up again"
    );
    let err = joinable("shop", r, "proxy", &[8080]).unwrap_err();
    assert!(err.to_string().contains("on its container \"shop\", not \"proxy\""), "{err}");
    assert!(err.help().contains("deployment/shop:shop"));
}

#[test]
fn the_agent_is_never_taken_for_the_app() {
    // hello's one container is "echo": once intercepted, the pod has two.
    let planned = plan(&fixture("hello"), &[], None, "a", &[8080]).unwrap();
    assert_eq!(choose_container(&planned.deployment, None).unwrap(), 0);
    let err = choose_container(&planned.deployment, Some(AGENT_CONTAINER)).unwrap_err().to_string();
    assert!(err.contains("(it has: echo)"), "{err}");
    let (mounts, _) = served(&planned.deployment, "echo");
    assert!(!mounts.is_empty(), "the service account's token at least");
}
