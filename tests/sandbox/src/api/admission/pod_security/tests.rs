use serde_json::json;

use super::*;

const C_ESCALATION: &str =
    r#"allowPrivilegeEscalation != false (container "c" must set securityContext.allowPrivilegeEscalation=false)"#;
const C_DROP: &str = r#"unrestricted capabilities (container "c" must set securityContext.capabilities.drop=["ALL"])"#;
const C_NON_ROOT: &str = r#"runAsNonRoot != true (pod or container "c" must set securityContext.runAsNonRoot=true)"#;
const C_SECCOMP: &str = r#"seccompProfile (pod or container "c" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")"#;

/// What `restricted` asks of a pod, at the pod's level and container "c"'s.
fn restricted_pod() -> Value {
    json!({
        "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "i", "securityContext": {
            "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}}],
    })
}

fn with(mut base: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer");
    base.pointer_mut(parent).expect("parent exists")[key] = value;
    base
}

#[test]
fn checks_and_their_messages() {
    let bare = json!({"containers": [{"name": "c", "image": "i"}]});
    let cases: Vec<(&str, Level, Value, String)> = vec![
        ("a bare pod is baseline", Level::Baseline, bare.clone(), String::new()),
        (
            "a bare pod is not restricted",
            Level::Restricted,
            bare.clone(),
            [C_ESCALATION, C_DROP, C_NON_ROOT, C_SECCOMP].join(", "),
        ),
        ("all restricted asks", Level::Restricted, restricted_pod(), String::new()),
        ("privileged allows anything", Level::Privileged, json!({"hostNetwork": true}), String::new()),
        (
            "kubectl run of a privileged root pod",
            Level::Restricted,
            json!({"containers": [{"name": "c", "image": "i",
                "securityContext": {"privileged": true, "runAsUser": 0}}]}),
            [
                r#"privileged (container "c" must not set securityContext.privileged=true)"#,
                C_ESCALATION,
                C_DROP,
                C_NON_ROOT,
                r#"runAsUser=0 (container "c" must not set runAsUser=0)"#,
                C_SECCOMP,
            ]
            .join(", "),
        ),
        (
            "host namespaces, sorted",
            Level::Baseline,
            json!({"hostPID": true, "hostNetwork": true, "hostIPC": false, "containers": []}),
            "host namespaces (hostNetwork, hostPID)".into(),
        ),
        (
            "hostPath volumes and host ports",
            Level::Baseline,
            json!({
                "volumes": [{"name": "h", "hostPath": {"path": "/"}}, {"name": "e", "emptyDir": {}}],
                "containers": [
                    {"name": "a", "ports": [{"containerPort": 80, "hostPort": 8080}]},
                    {"name": "b", "ports": [{"containerPort": 81, "hostPort": 80}, {"containerPort": 82}]},
                ],
            }),
            r#"hostPath volumes (volume "h"), hostPort (containers "a", "b" use hostPorts 80, 8080)"#.into(),
        ),
        (
            "capabilities beyond the runtime's default set",
            Level::Baseline,
            json!({"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN", "CHOWN", "NET_RAW"]}}}]}),
            r#"non-default capabilities (container "c" must not include "NET_RAW", "SYS_ADMIN" in securityContext.capabilities.add)"#
                .into(),
        ),
        (
            "seccomp Unconfined",
            Level::Baseline,
            json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}, "containers": [{"name": "c"}]}),
            r#"seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")"#.into(),
        ),
        (
            "sysctls outside the safe set",
            Level::Baseline,
            json!({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"},
                {"name": "net.ipv4.tcp_syncookies", "value": "1"}]}, "containers": []}),
            "forbidden sysctls (kernel.msgmax)".into(),
        ),
        (
            "an unmasked /proc",
            Level::Baseline,
            json!({"containers": [{"name": "c", "securityContext": {"procMount": "Unmasked"}},
                {"name": "d", "securityContext": {"procMount": "Default"}}]}),
            r#"procMount (container "c" must not set securityContext.procMount to "Unmasked")"#.into(),
        ),
        (
            "SELinux type and user",
            Level::Baseline,
            json!({"containers": [{"name": "c", "securityContext": {"seLinuxOptions": {"type": "spc_t", "user": "u"}}},
                {"name": "d", "securityContext": {"seLinuxOptions": {"type": "container_t", "level": "s0:c1"}}}]}),
            r#"seLinuxOptions (container "c" set forbidden securityContext.seLinuxOptions: type "spc_t"; user may not be set)"#
                .into(),
        ),
        (
            "restricted counts init containers and allows only NET_BIND_SERVICE",
            Level::Restricted,
            with(
                with(restricted_pod(), "/initContainers", json!([{"name": "init", "image": "i"}])),
                "/containers/0/securityContext/capabilities/add",
                json!(["SYS_TIME"]),
            ),
            [
                r#"allowPrivilegeEscalation != false (container "init" must set securityContext.allowPrivilegeEscalation=false)"#,
                r#"unrestricted capabilities (container "init" must set securityContext.capabilities.drop=["ALL"]; container "c" must not include "SYS_TIME" in securityContext.capabilities.add)"#,
            ]
            .join(", "),
        ),
        (
            "restricted volume types, explicit runAsNonRoot=false",
            Level::Restricted,
            with(
                with(restricted_pod(), "/volumes", json!([{"name": "h", "hostPath": {"path": "/"}}, {"name": "s", "secret": {}}])),
                "/containers/0/securityContext/runAsNonRoot",
                json!(false),
            ),
            [
                r#"hostPath volumes (volume "h")"#,
                r#"restricted volume types (volumes ["h"] have restricted types)"#,
                r#"runAsNonRoot != true (container "c" must not set securityContext.runAsNonRoot=false)"#,
            ]
            .join(", "),
        ),
        (
            "a container's own settings stand for the pod's",
            Level::Restricted,
            json!({"containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": true, "runAsUser": 1000,
                "seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}}}]}),
            String::new(),
        ),
    ];
    for (what, level, spec, want) in cases {
        assert_eq!(describe(&evaluate(level, &spec)), want, "{what}");
    }
}

#[test]
fn namespace_labels_make_the_policy() {
    let lv = |labels: Value| {
        let p = policy(&labels);
        (p.enforce.to_string(), p.warn.to_string())
    };
    assert_eq!(lv(Value::Null), ("privileged:latest".into(), "privileged:latest".into()));
    assert_eq!(
        lv(json!({ENFORCE: "restricted", ENFORCE_VERSION: "v1.32", WARN: "baseline"})),
        ("restricted:v1.32".into(), "baseline:latest".into())
    );
    // Unknown levels: enforce fails closed, warn fails open; bad versions are latest.
    assert_eq!(
        lv(json!({ENFORCE: "strict", ENFORCE_VERSION: "v1.032", WARN: "loud", WARN_VERSION: "1.30"})),
        ("restricted:latest".into(), "privileged:latest".into())
    );
}

#[test]
fn pods_are_refused_and_templates_warned_about() {
    let restricted = json!({ENFORCE: "restricted"});
    let pod = json!({"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
    let err = admit("Pod", &pod, None, &restricted).expect_err("refused");
    assert_eq!((err.code.as_u16(), err.reason), (403, "Forbidden"));
    assert_eq!(
        err.message,
        format!(
            "pods \"x\" is forbidden: violates PodSecurity \"restricted:latest\": {}",
            [C_ESCALATION, C_DROP, C_NON_ROOT, C_SECCOMP].join(", ")
        )
    );
    let compliant = json!({"metadata": {"name": "x"}, "spec": restricted_pod()});
    assert_eq!(admit("Pod", &compliant, None, &restricted).expect("admitted"), Vec::<String>::new());
    assert!(admit("Pod", &pod, None, &Value::Null).expect("no labels, no policy").is_empty());

    // An update that changes no image is not judged (labels, status...).
    let mut relabelled = pod.clone();
    relabelled["metadata"]["labels"] = json!({"a": "b"});
    assert!(admit("Pod", &relabelled, Some(&pod), &restricted).is_ok());
    let mut new_image = pod.clone();
    new_image["spec"]["containers"][0]["image"] = json!("j");
    assert_eq!(admit("Pod", &new_image, Some(&pod), &restricted).expect_err("judged").code.as_u16(), 403);

    // A Deployment is stored; only the warn level speaks of its template.
    let deployment = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": pod["spec"]}}});
    assert!(admit("Deployment", &deployment, None, &restricted).expect("stored").is_empty());
    let warned = json!({ENFORCE: "baseline", WARN: "restricted", WARN_VERSION: "v1.32"});
    assert_eq!(
        admit("Deployment", &deployment, None, &warned).expect("stored"),
        [format!(
            "would violate PodSecurity \"restricted:v1.32\": {}",
            [C_ESCALATION, C_DROP, C_NON_ROOT, C_SECCOMP].join(", ")
        )]
    );
    // A pod that passes enforce hears the warn level too.
    assert_eq!(admit("Pod", &pod, None, &warned).expect("admitted").len(), 1);
    assert!(admit("ConfigMap", &json!({}), None, &restricted).expect("not a pod").is_empty());
}

#[test]
fn namespace_labels_are_checked_and_a_stricter_level_names_the_pods_it_would_refuse() {
    let ns = |labels: Value| json!({"metadata": {"name": "shop", "labels": labels}});
    let err = admit_namespace(&ns(json!({ENFORCE: "strict", WARN_VERSION: "1.30"})), None, &[]).expect_err("422");
    assert_eq!(err.code.as_u16(), 422);
    assert_eq!(
        err.message,
        r#"Namespace "shop" is invalid: [metadata.labels[pod-security.kubernetes.io/enforce]: Invalid value: "strict": must be one of privileged, baseline, restricted, metadata.labels[pod-security.kubernetes.io/warn-version]: Invalid value: "1.30": must be "latest" or "v1.x"]"#
    );
    assert!(admit_namespace(&ns(json!({ENFORCE: "restricted"})), None, &[]).expect("created").is_empty());

    let pod = |name: &str, spec: Value| json!({"metadata": {"name": name}, "spec": spec});
    let root = json!({"containers": [{"name": "c", "image": "i"}]});
    let pods = [
        pod("web-b", root.clone()),
        pod("web-a", root.clone()),
        pod("host", json!({"hostNetwork": true, "containers": [{"name": "c"}]})),
        pod("ok", restricted_pod()),
    ];
    let before = ns(json!({"team": "shop"}));
    let warnings = admit_namespace(&ns(json!({ENFORCE: "restricted"})), Some(&before), &pods).expect("labelled");
    assert_eq!(
        warnings,
        [
            r#"existing pods in namespace "shop" violate the new PodSecurity enforce level "restricted:latest""#,
            "host: host namespaces, allowPrivilegeEscalation != false, unrestricted capabilities, runAsNonRoot != true, seccompProfile",
            "web-a (and 1 other pod): allowPrivilegeEscalation != false, unrestricted capabilities, runAsNonRoot != true, seccompProfile",
        ]
    );
    // Relaxing, keeping or dropping the level says nothing; baseline names only the host pod.
    let restricted = ns(json!({ENFORCE: "restricted"}));
    for relaxed in [json!({ENFORCE: "baseline"}), json!({ENFORCE: "restricted"}), json!({})] {
        assert!(admit_namespace(&ns(relaxed), Some(&restricted), &pods).expect("allowed").is_empty());
    }
    let baseline = admit_namespace(&ns(json!({ENFORCE: "baseline"})), Some(&before), &pods).expect("labelled");
    assert_eq!(baseline[1], "host: host namespaces");
    // Labels that were already wrong do not block other changes.
    let wrong = ns(json!({ENFORCE: "strict"}));
    assert!(admit_namespace(&wrong, Some(&wrong), &[]).is_ok());
}
