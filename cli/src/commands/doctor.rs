//! `tpd doctor`: one line per check, pass or fail, and for each failure the
//! command or setting that fixes it. Probing (IO) and judging (pure
//! functions over what the probe saw) are kept apart so the judgements can
//! be tested without Docker or a cluster.

use std::process::ExitCode;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceMapping, HostConfig};
use bollard::query_parameters::{LogsOptions, RemoveContainerOptions};
use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::api::{Api, PostParams};
use serde::Serialize;

use crate::cli::GlobalArgs;
use crate::cluster::{self, Cluster};
use crate::config::{self, Images};
use crate::docker;
use crate::output::OutputFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Could not be checked; does not fail the doctor.
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Check { name, status: Status::Pass, detail: detail.into(), fix: None }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check { name, status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
    fn warn(name: &'static str, detail: impl Into<String>) -> Self {
        Check { name, status: Status::Warn, detail: detail.into(), fix: None }
    }
}

pub async fn run(args: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let images = Images::resolve(args, &config::load()?);
    let mut checks = docker_checks(&images).await;
    checks.extend(cluster_checks(args).await);
    print(&checks, args.output);
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print(checks: &[Check], format: OutputFormat) {
    if format == OutputFormat::Json {
        let ok = checks.iter().all(|c| c.status != Status::Fail);
        println!("{}", serde_json::json!({ "ok": ok, "checks": checks }));
        return;
    }
    for check in checks {
        let mark = match check.status {
            Status::Pass => "[ok]  ",
            Status::Warn => "[warn]",
            Status::Fail => "[FAIL]",
        };
        println!("{mark} {:<16} {}", check.name, check.detail);
        if let Some(fix) = &check.fix {
            println!("       {:<16} fix: {fix}", "");
        }
    }
}

// ---- Docker ------------------------------------------------------------

async fn docker_checks(images: &Images) -> Vec<Check> {
    let docker = match docker::connect().await {
        Ok(docker) => docker,
        Err(hint) => {
            let skipped = "skipped: Docker is not reachable";
            return vec![
                Check::fail("docker", hint.message, hint.help),
                Check::warn("sidecar image", skipped),
                Check::warn("agent image", skipped),
                Check::warn("tun and fuse", skipped),
            ];
        }
    };
    let version = docker.version().await;
    let mut checks = vec![judge_docker(&docker::host(), version.as_ref().map_err(ToString::to_string))];
    let sidecar = probe_image(&docker, &images.sidecar).await;
    let sidecar_present = matches!(sidecar, ImageProbe::Present { .. });
    checks.push(judge_image("sidecar image", &images.sidecar, "--sidecar-image", sidecar));
    checks.push(judge_image("agent image", &images.agent, "--agent-image", probe_image(&docker, &images.agent).await));
    checks.push(if sidecar_present {
        judge_selfcheck(probe_selfcheck(&docker, &images.sidecar).await)
    } else {
        Check::warn("tun and fuse", "skipped: the sidecar image is missing")
    });
    checks
}

fn judge_docker(host: &str, version: Result<&bollard::models::SystemVersion, String>) -> Check {
    match version {
        Ok(v) => Check::pass(
            "docker",
            format!(
                "reachable at {host} (engine {}, API {})",
                v.version.as_deref().unwrap_or("?"),
                v.api_version.as_deref().unwrap_or("?")
            ),
        ),
        Err(e) => Check::fail("docker", format!("{host} answered but not its version: {e}"), "restart Docker"),
    }
}

#[derive(Debug)]
enum ImageProbe {
    Present { size: i64 },
    Missing,
    Error(String),
}

async fn probe_image(docker: &Docker, image: &str) -> ImageProbe {
    match docker.inspect_image(image).await {
        Ok(info) => ImageProbe::Present { size: info.size.unwrap_or(0) },
        Err(e) if docker::is_not_found(&e) => ImageProbe::Missing,
        Err(e) => ImageProbe::Error(e.to_string()),
    }
}

fn judge_image(name: &'static str, image: &str, flag: &str, probe: ImageProbe) -> Check {
    match probe {
        ImageProbe::Present { size } => Check::pass(name, format!("{image} ({:.1} MB)", size as f64 / 1e6)),
        ImageProbe::Missing => Check::fail(
            name,
            format!("{image} is not in the local Docker engine"),
            format!(
                "load or pull it (`docker load -i FILE`, `docker pull {image}`), or name another image with {flag}; \
                 in a source checkout of tpd, `cargo xtask images` builds it"
            ),
        ),
        ImageProbe::Error(e) => {
            Check::fail(name, format!("cannot inspect {image}: {e}"), "check that Docker is healthy")
        }
    }
}

/// What a throwaway sidecar container reported when asked to open a TUN
/// device and /dev/fuse (`tpd-sidecar selfcheck`).
#[derive(Debug)]
enum SelfcheckProbe {
    Ran { exit_code: i64, output: String },
    DockerError(String),
}

async fn probe_selfcheck(docker: &Docker, image: &str) -> SelfcheckProbe {
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(vec!["selfcheck".into()]),
        labels: Some(
            [(tpd_wire::names::LABEL_MANAGED_BY.to_string(), tpd_wire::names::MANAGED_BY_VALUE.to_string())].into(),
        ),
        host_config: Some(HostConfig {
            cap_add: Some(vec!["NET_ADMIN".into(), "SYS_ADMIN".into()]),
            devices: Some(["/dev/net/tun", "/dev/fuse"].map(device).to_vec()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = match docker.create_container(None, body).await {
        Ok(created) => created.id,
        Err(e) => return SelfcheckProbe::DockerError(e.to_string()),
    };
    let probe = run_to_exit(docker, &id).await;
    let remove = RemoveContainerOptions { force: true, ..Default::default() };
    if let Err(e) = docker.remove_container(&id, Some(remove)).await {
        tracing::warn!("could not remove the selfcheck container {id}: {e}");
    }
    probe
}

fn device(path: &str) -> DeviceMapping {
    DeviceMapping {
        path_on_host: Some(path.into()),
        path_in_container: Some(path.into()),
        cgroup_permissions: Some("rwm".into()),
    }
}

async fn run_to_exit(docker: &Docker, id: &str) -> SelfcheckProbe {
    if let Err(e) = docker.start_container(id, None).await {
        return SelfcheckProbe::DockerError(e.to_string());
    }
    let exit_code = match docker.wait_container(id, None).next().await {
        Some(Ok(done)) => done.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        Some(Err(e)) => return SelfcheckProbe::DockerError(e.to_string()),
        None => return SelfcheckProbe::DockerError("the container vanished".into()),
    };
    let logs = LogsOptions { stdout: true, stderr: true, ..Default::default() };
    let output: Vec<String> =
        docker.logs(id, Some(logs)).filter_map(|l| async { l.ok().map(|l| l.to_string()) }).collect().await;
    SelfcheckProbe::Ran { exit_code, output: output.concat() }
}

fn judge_selfcheck(probe: SelfcheckProbe) -> Check {
    const NAME: &str = "tun and fuse";
    let (exit_code, output) = match probe {
        SelfcheckProbe::Ran { exit_code, output } => (exit_code, output),
        SelfcheckProbe::DockerError(e) => {
            return Check::fail(NAME, format!("could not run a sidecar container: {e}"), device_fix(&e));
        }
    };
    if exit_code == 0 {
        return Check::pass(NAME, "a sidecar container created a TUN device and opened /dev/fuse");
    }
    let failures: Vec<&str> = output.lines().filter(|l| l.contains("error")).collect();
    let detail = if failures.is_empty() {
        format!("the sidecar's selfcheck exited with {exit_code}: {}", output.trim())
    } else {
        failures.join("; ")
    };
    let fix = device_fix(&detail);
    Check::fail(NAME, detail, fix)
}

/// The fix for a missing device, guessed from which device the message names.
fn device_fix(message: &str) -> String {
    let mut fixes = Vec::new();
    if message.contains("tun") {
        fixes.push("load the TUN driver (`sudo modprobe tun`) so /dev/net/tun exists");
    }
    if message.contains("fuse") {
        fixes.push("load FUSE (`sudo modprobe fuse`) so /dev/fuse exists");
    }
    if fixes.is_empty() {
        fixes.push(
            "run `docker run --rm --cap-add NET_ADMIN --device /dev/net/tun busybox true` to see what Docker refuses",
        );
    }
    fixes.join("; ")
}

// ---- Kubernetes --------------------------------------------------------

/// The permissions a session needs in its namespace.
const NEEDED: &[(&str, &str, &str, Option<&str>)] = &[
    // (verb, group, resource, subresource)
    ("get", "apps", "deployments", None),
    ("patch", "apps", "deployments", None),
    ("create", "", "pods", None),
    ("create", "", "pods", Some("portforward")),
];

async fn cluster_checks(args: &GlobalArgs) -> Vec<Check> {
    let cluster = match cluster::connect(args).await {
        Ok(cluster) => cluster,
        Err(hint) => {
            return vec![
                Check::fail("kube context", hint.message, hint.help),
                Check::warn("permissions", "skipped: no cluster to ask"),
            ];
        }
    };
    let version = cluster.client.apiserver_version().await.map(|v| v.git_version).map_err(|e| e.to_string());
    let reachable = version.is_ok();
    let mut checks = vec![judge_context(&cluster, version)];
    checks.push(if reachable {
        judge_access(&cluster.namespace, probe_access(&cluster).await)
    } else {
        Check::warn("permissions", "skipped: the cluster is not reachable")
    });
    checks
}

fn judge_context(cluster: &Cluster, version: Result<String, String>) -> Check {
    const NAME: &str = "kube context";
    match version {
        Ok(v) => Check::pass(
            NAME,
            format!("{} at {} (Kubernetes {v}), namespace {}", cluster.context, cluster.server, cluster.namespace),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{} at {} is not reachable: {e}", cluster.context, cluster.server),
            format!("check the cluster is up: `kubectl --context {} cluster-info`", cluster.context),
        ),
    }
}

/// For each needed permission: allowed or not, or why it could not be asked.
type AccessProbe = Result<Vec<(String, bool)>, kube::Error>;

async fn probe_access(cluster: &Cluster) -> AccessProbe {
    let api: Api<SelfSubjectAccessReview> = Api::all(cluster.client.clone());
    let mut answers = Vec::new();
    for (verb, group, resource, sub) in NEEDED {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(cluster.namespace.clone()),
                    verb: Some(verb.to_string()),
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    subresource: sub.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let allowed = api.create(&PostParams::default(), &review).await?.status.map(|s| s.allowed).unwrap_or(false);
        answers.push((describe_permission(verb, group, resource, *sub), allowed));
    }
    Ok(answers)
}

fn describe_permission(verb: &str, group: &str, resource: &str, sub: Option<&str>) -> String {
    let qualified = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
    match sub {
        Some(sub) => format!("{verb} {qualified}/{sub}"),
        None => format!("{verb} {qualified}"),
    }
}

fn judge_access(namespace: &str, probe: AccessProbe) -> Check {
    const NAME: &str = "permissions";
    let answers = match probe {
        Ok(answers) => answers,
        Err(e) if cluster::is_not_found(&e) => {
            return Check::warn(NAME, "could not check: the cluster does not serve SelfSubjectAccessReview");
        }
        Err(e) => return Check::warn(NAME, format!("could not check: {e}")),
    };
    let denied: Vec<&str> = answers.iter().filter(|(_, ok)| !ok).map(|(what, _)| what.as_str()).collect();
    if denied.is_empty() {
        let all: Vec<&str> = answers.iter().map(|(what, _)| what.as_str()).collect();
        return Check::pass(NAME, format!("may {} in namespace {namespace}", all.join(", ")));
    }
    Check::fail(
        NAME,
        format!("may not {} in namespace {namespace}", denied.join(", ")),
        format!(
            "ask a cluster admin for a Role in {namespace} granting these verbs (check with `kubectl auth can-i --list -n {namespace}`)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_down_is_a_failure_with_a_fix() {
        let check = judge_docker("unix:///nope.sock", Err("connection refused".into()));
        assert_eq!(check.status, Status::Fail);
        assert!(check.fix.is_some());
    }

    #[test]
    fn missing_image_names_the_build_command_and_the_flag() {
        let check = judge_image("agent image", "tpd/agent:0.1.0", "--agent-image", ImageProbe::Missing);
        assert_eq!(check.status, Status::Fail);
        let fix = check.fix.unwrap();
        assert!(fix.contains("cargo xtask images") && fix.contains("--agent-image"), "{fix}");
        let present =
            judge_image("agent image", "tpd/agent:0.1.0", "--agent-image", ImageProbe::Present { size: 4_000_000 });
        assert_eq!(present.status, Status::Pass);
        assert!(present.detail.contains("4.0 MB"));
    }

    #[test]
    fn no_tun_points_at_the_tun_driver() {
        let output = "tun: error: opening /dev/net/tun: No such file or directory\nfuse: ok\n";
        let check = judge_selfcheck(SelfcheckProbe::Ran { exit_code: 1, output: output.into() });
        assert_eq!(check.status, Status::Fail);
        assert!(check.detail.contains("/dev/net/tun"), "{}", check.detail);
        let fix = check.fix.unwrap();
        assert!(fix.contains("modprobe tun") && !fix.contains("modprobe fuse"), "{fix}");
    }

    #[test]
    fn docker_refusing_the_device_is_explained() {
        let e = "error gathering device information while adding custom device \"/dev/fuse\": no such file";
        let check = judge_selfcheck(SelfcheckProbe::DockerError(e.into()));
        assert_eq!(check.status, Status::Fail);
        assert!(check.fix.unwrap().contains("modprobe fuse"));
        let ok = judge_selfcheck(SelfcheckProbe::Ran { exit_code: 0, output: "tun: ok\nfuse: ok\n".into() });
        assert_eq!(ok.status, Status::Pass);
    }

    #[test]
    fn forbidden_lists_what_is_denied() {
        let answers = vec![("get deployments.apps".to_string(), true), ("patch deployments.apps".to_string(), false)];
        let check = judge_access("dev", Ok(answers));
        assert_eq!(check.status, Status::Fail);
        assert!(check.detail.contains("patch deployments.apps") && !check.detail.contains("get deployments"));
        assert!(check.fix.unwrap().contains("kubectl auth can-i"));
    }

    #[test]
    fn access_review_missing_is_a_warning_not_a_failure() {
        let status =
            kube::core::Status::failure("the server could not find the requested resource", "NotFound").with_code(404);
        let check = judge_access("dev", Err(kube::Error::Api(Box::new(status))));
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("could not check"));
    }

    #[test]
    fn permissions_are_described_like_kubectl() {
        assert_eq!(describe_permission("create", "", "pods", Some("portforward")), "create pods/portforward");
        assert_eq!(describe_permission("patch", "apps", "deployments", None), "patch deployments.apps");
    }
}
