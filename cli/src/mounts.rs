//! Where the remote volumes appear: the Docker mounts that carry the
//! sidecar's FUSE mounts into the developer's container ([`plan`], pure: the
//! caller creates the containers; see docs/volumes.md for why it works this
//! way), and their removal when the session ends ([`stop_sidecar`],
//! [`release`]), so no mount is left on the host on any exit path.
//!
//! The sidecar FUSE-mounts each volume at `SIDECAR_VOLUMES_DIR/<i>-<name>`,
//! a host directory bind-mounted with **rshared** propagation, so each FUSE
//! mount also appears on the host. The developer's container binds each
//! volume's host subdirectory with **rslave** propagation at the volume's
//! real mountPath, and again under the mount root (`TPD_ROOT`), so it sees
//! the mounts without any privilege of its own.
//!
//! Docker accepts rshared only when the host directory lies on a shared
//! mount. The CLI need not be root for that: a Docker named volume's
//! `Mountpoint` (under the engine's data root, which the engine keeps shared)
//! works, and on a systemd host every directory does. Create the volume
//! `tpd-<session>-volumes` with the session's labels and pass its Mountpoint
//! as `host_dir`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, Mount, MountBindOptions, MountBindOptionsPropagationEnum, MountType,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions, RemoveVolumeOptions,
    StopContainerOptions, WaitContainerOptions,
};
use futures::StreamExt;
use tpd_wire::files::{self, VolumeMount};
use tpd_wire::names;

/// Where all volumes also appear in the developer's container when the user
/// gives no `--mount-root` (the value of `TPD_ROOT`).
pub const DEFAULT_MOUNT_ROOT: &str = "/tpd/remote";

/// The mounts for both containers and the env var telling the app where the
/// mount root is.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeMounts {
    /// For the sidecar container (which also needs SYS_ADMIN and /dev/fuse).
    pub sidecar: Vec<Mount>,
    /// For the developer's container.
    pub app: Vec<Mount>,
    /// `(TPD_ROOT, mount root)`.
    pub env: (String, String),
}

/// Plans the mounts for `volumes` (in the order given to the agent in
/// `TPD_AGENT_MOUNTS`, which fixes each volume's directory), with `host_dir`
/// the shared host directory and `mount_root` the app-side root prefix.
pub fn plan(host_dir: &str, volumes: &[VolumeMount], mount_root: &str) -> VolumeMounts {
    let host_dir = host_dir.trim_end_matches('/');
    let root = mount_root.trim_end_matches('/');
    let sidecar = vec![bind(host_dir, files::SIDECAR_VOLUMES_DIR, MountBindOptionsPropagationEnum::RSHARED, false)];
    let app = volumes
        .iter()
        .enumerate()
        .flat_map(|(i, v)| {
            let source = format!("{host_dir}/{}", files::mount_dir_name(i, &v.name));
            let at_root = format!("{root}/{}", v.mount_path.trim_start_matches('/'));
            [
                bind(&source, &v.mount_path, MountBindOptionsPropagationEnum::RSLAVE, v.read_only),
                bind(&source, &at_root, MountBindOptionsPropagationEnum::RSLAVE, v.read_only),
            ]
        })
        .collect();
    VolumeMounts { sidecar, app, env: (tpd_wire::names::ENV_TPD_ROOT.to_owned(), root.to_owned()) }
}

/// The Docker volume whose directory (its `Mountpoint`) carries a session's
/// FUSE mounts.
pub fn volume_name(session: &str) -> String {
    format!("tpd-{session}-volumes")
}

/// How long the sidecar gets to unmount after SIGTERM before Docker kills it.
const SIDECAR_STOP_SECONDS: i32 = 3;
/// How long [`release`] keeps trying, helper runs included.
const RELEASE_DEADLINE: Duration = Duration::from_secs(30);
/// The pause between two of its attempts.
const RELEASE_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Stops the session's sidecar, if it runs, with SIGTERM so it unmounts every
/// volume itself (Docker's forced removal would SIGKILL it and leave dead
/// mounts on the host). Returns the sidecar's image, for [`release`]'s helper.
pub async fn stop_sidecar(docker: &Docker, session: &str) -> anyhow::Result<Option<String>> {
    let filters = [("label".to_owned(), vec![format!("{}={session}", names::LABEL_SESSION)])].into_iter().collect();
    let list = docker
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() }))
        .await?;
    let name = format!("/tpd-sidecar-{session}");
    let Some(sidecar) = list.into_iter().find(|c| c.names.iter().flatten().any(|n| *n == name)) else {
        return Ok(None);
    };
    if sidecar.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING) {
        let id = sidecar.id.clone().unwrap_or_default();
        docker
            .stop_container(&id, Some(StopContainerOptions { t: Some(SIDECAR_STOP_SECONDS), ..Default::default() }))
            .await?;
    }
    Ok(sidecar.image)
}

/// Removes the session's volume directory once its containers are gone. A
/// sidecar that died without unmounting (SIGKILL, OOM) leaves dead FUSE
/// mounts there, which make the removal fail; then a helper container from
/// `helper_image` (the sidecar image, SYS_ADMIN, the directory bound rshared
/// as in the sidecar) runs `tpd-sidecar release-volumes`, whose lazy
/// unmounts propagate to the host, and the removal is retried.
///
/// Two cleanups of one session can overlap (a `tpd run` killed in its own
/// cleanup, then its guardian's), so the first can leave a helper or a
/// container removal still finishing in the engine; each attempt checks
/// again, until [`RELEASE_DEADLINE`].
///
/// Never call it while the sidecar runs: removing a directory that holds
/// live mounts would delete the pod's files through them. It checks.
pub async fn release(
    docker: &Docker,
    session: &str,
    helper_image: &str,
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + RELEASE_DEADLINE;
    loop {
        let attempt = release_once(docker, session, helper_image, labels.clone());
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => {
                anyhow::bail!("the session's volume mounts were not released within {} s", RELEASE_DEADLINE.as_secs())
            }
        };
        if tokio::time::Instant::now() + RELEASE_RETRY_PAUSE >= deadline {
            return Err(error);
        }
        tracing::info!("releasing the session's volume mounts: {error:#}; trying again");
        tokio::time::sleep(RELEASE_RETRY_PAUSE).await;
    }
}

/// One attempt of [`release`].
async fn release_once(
    docker: &Docker,
    session: &str,
    helper_image: &str,
    labels: HashMap<String, String>,
) -> anyhow::Result<()> {
    let volume = volume_name(session);
    let dir = match docker.inspect_volume(&volume).await {
        Ok(v) => v.mountpoint,
        Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot inspect the Docker volume {volume}"));
        }
    };
    let filters = [("label".to_owned(), vec![format!("{}={session}", names::LABEL_SESSION)])].into_iter().collect();
    let running =
        docker.list_containers(Some(ListContainersOptions { filters: Some(filters), ..Default::default() })).await?;
    // A helper of an overlapping cleanup only unmounts; the next one replaces it.
    let helper = format!("/{}", helper_name(session));
    if running.iter().any(|c| !c.names.iter().flatten().any(|n| *n == helper)) {
        anyhow::bail!("the session's containers still run; remove them before the volume {volume}");
    }
    if docker.remove_volume(&volume, None::<RemoveVolumeOptions>).await.is_ok() {
        return Ok(());
    }
    let said = run_helper(docker, session, helper_image, &dir, labels).await?;
    docker
        .remove_volume(&volume, None::<RemoveVolumeOptions>)
        .await
        .with_context(|| format!("cannot remove the Docker volume {volume} (the release helper said: {})", said.trim()))
}

/// The release helper's container: no network, only SYS_ADMIN (umount) and
/// the session's volume directory, bound as in the sidecar.
pub fn helper_container(image: &str, host_dir: &str, labels: HashMap<String, String>) -> ContainerCreateBody {
    ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(vec!["release-volumes".into(), "--root".into(), files::SIDECAR_VOLUMES_DIR.into()]),
        labels: Some(labels),
        network_disabled: Some(true),
        host_config: Some(HostConfig {
            cap_add: Some(vec!["SYS_ADMIN".into()]),
            security_opt: Some(vec!["apparmor:unconfined".into()]),
            mounts: Some(plan(host_dir, &[], DEFAULT_MOUNT_ROOT).sidecar),
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The release helper's container name: one per session, so an overlapping
/// cleanup replaces a helper rather than running a second one.
fn helper_name(session: &str) -> String {
    format!("tpd-release-{session}")
}

/// Runs the helper to completion and returns what it printed.
async fn run_helper(
    docker: &Docker,
    session: &str,
    image: &str,
    host_dir: &str,
    labels: HashMap<String, String>,
) -> anyhow::Result<String> {
    let name = helper_name(session);
    // A cleanup killed while its helper ran (tpd SIGKILLed mid-cleanup) left
    // this name taken; the guardian's cleanup runs the helper again.
    let force = RemoveContainerOptions { force: true, ..Default::default() };
    let _ = docker.remove_container(&name, Some(force)).await;
    let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
    let id = docker
        .create_container(Some(options), helper_container(image, host_dir, labels))
        .await
        .with_context(|| format!("cannot create the volume release helper from {image}"))?
        .id;
    let result = async {
        docker.start_container(&id, None).await.context("cannot start the volume release helper")?;
        // A non-zero exit comes back as an error item; the output says why.
        let _ = docker.wait_container(&id, None::<WaitContainerOptions>).collect::<Vec<_>>().await;
        let options = LogsOptions { stdout: true, stderr: true, ..Default::default() };
        let lines: Vec<String> =
            docker.logs(&id, Some(options)).filter_map(|l| async { l.ok().map(|l| l.to_string()) }).collect().await;
        Ok(lines.concat())
    }
    .await;
    let _ = docker.remove_container(&id, Some(RemoveContainerOptions { force: true, ..Default::default() })).await;
    result
}

fn bind(source: &str, target: &str, propagation: MountBindOptionsPropagationEnum, read_only: bool) -> Mount {
    Mount {
        source: Some(source.to_owned()),
        target: Some(target.to_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        bind_options: Some(MountBindOptions { propagation: Some(propagation), ..Default::default() }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, path: &str, read_only: bool) -> VolumeMount {
        VolumeMount { name: name.into(), mount_path: path.into(), read_only, sub_path: None }
    }

    fn spec(m: &Mount) -> String {
        let prop = m.bind_options.as_ref().and_then(|b| b.propagation).map(|p| p.to_string()).unwrap_or_default();
        let ro = if m.read_only == Some(true) { ",ro" } else { "" };
        format!("{}:{}:{prop}{ro}", m.source.as_deref().unwrap_or(""), m.target.as_deref().unwrap_or(""))
    }

    #[test]
    fn each_volume_at_its_path_and_under_the_root() {
        let volumes = [
            vm("config", "/etc/app", true),
            vm("kube-api-access-x1", "/var/run/secrets/kubernetes.io/serviceaccount", true),
            vm("data", "/data/", false),
        ];
        let m = plan("/var/lib/docker/volumes/tpd-s1-volumes/_data/", &volumes, "/tpd/remote/");
        let h = "/var/lib/docker/volumes/tpd-s1-volumes/_data";
        assert_eq!(m.sidecar.iter().map(spec).collect::<Vec<_>>(), [format!("{h}:/tpd/volumes:rshared")]);
        assert_eq!(
            m.app.iter().map(spec).collect::<Vec<_>>(),
            [
                format!("{h}/0-config:/etc/app:rslave,ro"),
                format!("{h}/0-config:/tpd/remote/etc/app:rslave,ro"),
                format!("{h}/1-kube-api-access-x1:/var/run/secrets/kubernetes.io/serviceaccount:rslave,ro"),
                format!("{h}/1-kube-api-access-x1:/tpd/remote/var/run/secrets/kubernetes.io/serviceaccount:rslave,ro"),
                format!("{h}/2-data:/data/:rslave"),
                format!("{h}/2-data:/tpd/remote/data/:rslave"),
            ]
        );
        assert_eq!(m.env, ("TPD_ROOT".to_owned(), "/tpd/remote".to_owned()));
    }

    #[test]
    fn the_release_helper_binds_the_directory_as_the_sidecar_does() {
        let h = "/var/lib/docker/volumes/tpd-s1-volumes/_data";
        let body =
            helper_container("tpd/sidecar:0.1.0", h, HashMap::from([("tpd.dev/session".to_owned(), "s1".to_owned())]));
        let host = body.host_config.as_ref().expect("host config");
        assert_eq!(host.mounts.iter().flatten().map(spec).collect::<Vec<_>>(), [format!("{h}:/tpd/volumes:rshared")]);
        assert_eq!(host.cap_add, Some(vec!["SYS_ADMIN".to_owned()]));
        assert_eq!(host.devices, None, "no /dev/fuse: it only unmounts");
        assert_eq!(body.cmd, Some(vec!["release-volumes".to_owned(), "--root".to_owned(), "/tpd/volumes".to_owned()]));
        assert_eq!(volume_name("s1"), "tpd-s1-volumes");
    }

    #[test]
    fn no_volumes_means_no_app_mounts() {
        let m = plan("/h", &[], DEFAULT_MOUNT_ROOT);
        assert!(m.app.is_empty());
        assert_eq!(m.sidecar.len(), 1);
    }
}
