//! Pod volumes as host directories under the instance's state dir, bind
//! mounted into the pod's containers.
//!
//! ```text
//! <state>/pods/<uid>/volumes/<volume>/   emptyDir, configMap, secret, downwardAPI, projected, token
//! <state>/pvc/<namespace>/<claim>/       persistentVolumeClaim (outlives the pod)
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume, VolumeMount};

use super::env::{PodSources, field_value};

/// Where a pod's service-account credentials are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The name of the volume the node adds for them when the pod has none.
const SERVICE_ACCOUNT_VOLUME: &str = "kube-api-access-sandbox";

/// What the token volume holds: a token for the pod's service account and
/// the API server's CA bundle.
#[derive(Debug, Clone, Default)]
pub struct ServiceAccountFiles {
    pub token: String,
    pub ca_crt: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("writing volume {volume}: {source}")]
    Io {
        volume: String,
        #[source]
        source: std::io::Error,
    },
    #[error("configmap \"{0}\" not found")]
    ConfigMapMissing(String),
    #[error("secret \"{0}\" not found")]
    SecretMissing(String),
    #[error("volume {0:?} is not defined in the pod")]
    Undefined(String),
    #[error("subPath {0:?} must be a relative path inside the volume")]
    SubPath(String),
    #[error("{0}")]
    Env(#[from] super::env::EnvError),
}

/// The host directory of each of the pod's volumes, by volume name.
#[derive(Debug, Default)]
pub struct PodVolumes {
    dirs: BTreeMap<String, (PathBuf, bool)>,
    /// Whether the node adds the service-account mount to every container.
    service_account: bool,
    /// The pod's resolv.conf on the host, mounted into every container.
    resolv_conf: PathBuf,
}

pub fn pod_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join("pods").join(uid)
}

/// Writes every volume of `pod` under its pod directory.
pub fn prepare(
    pod: &Pod,
    src: &PodSources,
    sa: &ServiceAccountFiles,
    state_dir: &Path,
) -> Result<PodVolumes, VolumeError> {
    let uid = pod.metadata.uid.as_deref().unwrap_or("unknown");
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let base = pod_dir(state_dir, uid).join("volumes");
    let spec = pod.spec.clone().unwrap_or_default();
    let etc = pod_dir(state_dir, uid).join("etc");
    let mut out = PodVolumes { resolv_conf: etc.join("resolv.conf"), ..Default::default() };
    write_files(&etc, &[("resolv.conf".into(), super::spec::resolv_conf(pod).into_bytes(), None)], 0o644)
        .map_err(|source| VolumeError::Io { volume: "resolv.conf".into(), source })?;
    for vol in spec.volumes.iter().flatten() {
        let io = |source| VolumeError::Io { volume: vol.name.clone(), source };
        let (dir, read_only) = volume_dir(pod, vol, src, sa, &base, state_dir, ns).map_err(|e| match e {
            VolumeError::Io { source, .. } => io(source),
            other => other,
        })?;
        if let Some(gid) = fs_group(pod)
            && vol.host_path.is_none()
        {
            apply_fs_group(&dir, gid, read_only)
                .map_err(|source| VolumeError::Io { volume: vol.name.clone(), source })?;
        }
        out.dirs.insert(vol.name.clone(), (dir, read_only));
    }
    let automount = spec.automount_service_account_token.unwrap_or(true);
    let mounted = all_containers(pod)
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| m.mount_path.trim_end_matches('/') == SERVICE_ACCOUNT_DIR);
    if automount && !mounted {
        let dir = base.join(SERVICE_ACCOUNT_VOLUME);
        write_files(&dir, &token_files(ns, sa), 0o644)
            .and_then(|()| fs_group(pod).map_or(Ok(()), |gid| apply_fs_group(&dir, gid, true)))
            .map_err(|source| VolumeError::Io { volume: SERVICE_ACCOUNT_VOLUME.into(), source })?;
        out.dirs.insert(SERVICE_ACCOUNT_VOLUME.into(), (dir, true));
        out.service_account = true;
    }
    Ok(out)
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.map(|s| s.containers.iter()).into_iter().flatten())
}

fn token_files(ns: &str, sa: &ServiceAccountFiles) -> Vec<(String, Vec<u8>, Option<i32>)> {
    vec![
        ("token".into(), sa.token.clone().into_bytes(), None),
        ("ca.crt".into(), sa.ca_crt.clone().into_bytes(), None),
        ("namespace".into(), ns.as_bytes().to_vec(), None),
    ]
}

#[allow(clippy::too_many_arguments)]
fn volume_dir(
    pod: &Pod,
    vol: &Volume,
    src: &PodSources,
    sa: &ServiceAccountFiles,
    base: &Path,
    state_dir: &Path,
    ns: &str,
) -> Result<(PathBuf, bool), VolumeError> {
    let dir = base.join(&vol.name);
    let io = |source| VolumeError::Io { volume: vol.name.clone(), source };
    if let Some(hp) = &vol.host_path {
        let path = PathBuf::from(&hp.path);
        // The node creates it as itself (root) with mode 0755, as the
        // kubelet does; fsGroup is not applied to a hostPath.
        if matches!(hp.type_.as_deref(), Some("DirectoryOrCreate")) && !path.exists() {
            std::fs::create_dir_all(&path).map_err(io)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
        return Ok((path, false));
    }
    if let Some(pvc) = &vol.persistent_volume_claim {
        let path = state_dir.join("pvc").join(ns).join(&pvc.claim_name);
        make_shared_dir(&path).map_err(io)?;
        return Ok((path, pvc.read_only.unwrap_or(false)));
    }
    if let Some(cm) = &vol.config_map {
        let files = match src.config_maps.get(&cm.name) {
            Some(obj) => {
                let mut data: BTreeMap<String, Vec<u8>> =
                    obj.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect();
                data.extend(obj.binary_data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())));
                select_items(data, cm.items.as_deref())
            }
            None if cm.optional == Some(true) => Vec::new(),
            None => return Err(VolumeError::ConfigMapMissing(cm.name.clone())),
        };
        write_files(&dir, &files, cm.default_mode.unwrap_or(0o644)).map_err(io)?;
        return Ok((dir, true));
    }
    if let Some(s) = &vol.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let files = match src.secrets.get(&name) {
            Some(obj) => select_items(
                obj.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect(),
                s.items.as_deref(),
            ),
            None if s.optional == Some(true) => Vec::new(),
            None => return Err(VolumeError::SecretMissing(name)),
        };
        write_files(&dir, &files, s.default_mode.unwrap_or(0o644)).map_err(io)?;
        return Ok((dir, true));
    }
    if let Some(d) = &vol.downward_api {
        let mut files = Vec::new();
        for item in d.items.iter().flatten() {
            if let Some(f) = &item.field_ref {
                files.push((item.path.clone(), field_value(pod, f, src)?.into_bytes(), item.mode));
            }
        }
        write_files(&dir, &files, d.default_mode.unwrap_or(0o644)).map_err(io)?;
        return Ok((dir, true));
    }
    if let Some(p) = &vol.projected {
        let mut files = Vec::new();
        for source in p.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                match src.config_maps.get(&cm.name) {
                    Some(obj) => files.extend(select_items(
                        obj.data.iter().flatten().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect(),
                        cm.items.as_deref(),
                    )),
                    // kube-root-ca.crt is what every token volume projects;
                    // fall back to the CA the node was given.
                    None if cm.name == "kube-root-ca.crt" => {
                        files.push(("ca.crt".into(), sa.ca_crt.clone().into_bytes(), None))
                    }
                    None if cm.optional == Some(true) => {}
                    None => return Err(VolumeError::ConfigMapMissing(cm.name.clone())),
                }
            }
            if let Some(s) = &source.secret {
                match src.secrets.get(&s.name) {
                    Some(obj) => files.extend(select_items(
                        obj.data.iter().flatten().map(|(k, v)| (k.clone(), v.0.clone())).collect(),
                        s.items.as_deref(),
                    )),
                    None if s.optional == Some(true) => {}
                    None => return Err(VolumeError::SecretMissing(s.name.clone())),
                }
            }
            if let Some(d) = &source.downward_api {
                for item in d.items.iter().flatten() {
                    if let Some(f) = &item.field_ref {
                        files.push((item.path.clone(), field_value(pod, f, src)?.into_bytes(), item.mode));
                    }
                }
            }
            if let Some(t) = &source.service_account_token {
                files.push((t.path.clone(), sa.token.clone().into_bytes(), None));
            }
        }
        write_files(&dir, &files, p.default_mode.unwrap_or(0o644)).map_err(io)?;
        return Ok((dir, true));
    }
    // emptyDir, and anything the sandbox does not model, is a fresh
    // world-writable directory (as the kubelet creates emptyDir).
    make_shared_dir(&dir).map_err(io)?;
    Ok((dir, false))
}

fn fs_group(pod: &Pod) -> Option<u32> {
    pod.spec.as_ref()?.security_context.as_ref()?.fs_group.and_then(|g| u32::try_from(g).ok())
}

/// What the kubelet does for `fsGroup` (`SetVolumeOwnership`): the volume's
/// files belong to the group, which may read them (and write them, in a
/// writable volume); directories are setgid and searchable by the group, so
/// what the pod's containers create in them belongs to the group too.
fn apply_fs_group(path: &Path, gid: u32, read_only: bool) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))?;
    let meta = std::fs::symlink_metadata(path)?;
    let mut mask = if read_only { 0o440 } else { 0o660 };
    if meta.is_dir() {
        mask |= 0o2110;
        for entry in std::fs::read_dir(path)? {
            apply_fs_group(&entry?.path(), gid, read_only)?;
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.permissions().mode() | mask))
}

fn make_shared_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
}

fn select_items(data: BTreeMap<String, Vec<u8>>, items: Option<&[KeyToPath]>) -> Vec<(String, Vec<u8>, Option<i32>)> {
    match items {
        None => data.into_iter().map(|(k, v)| (k, v, None)).collect(),
        Some(items) => {
            items.iter().filter_map(|i| data.get(&i.key).map(|v| (i.path.clone(), v.clone(), i.mode))).collect()
        }
    }
}

/// Writes `files` into `dir` (replacing what was there), each with its own
/// mode or `default_mode`. Paths escaping `dir` are skipped.
fn write_files(dir: &Path, files: &[(String, Vec<u8>, Option<i32>)], default_mode: i32) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for (rel, data, mode) in files {
        let Some(rel) = confined(rel) else { continue };
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, data)?;
        let mode = u32::try_from(mode.unwrap_or(default_mode)).unwrap_or(0o644) & 0o7777;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// A relative path with no `..`, or None.
fn confined(rel: &str) -> Option<&Path> {
    let p = Path::new(rel);
    p.components().all(|c| matches!(c, Component::Normal(_))).then_some(p)
}

impl PodVolumes {
    /// Docker bind specs (`host:container[:ro]`) for the container's mounts.
    pub fn binds(&self, container: &Container) -> Result<Vec<String>, VolumeError> {
        let mut binds = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            binds.push(self.bind(m)?);
        }
        if self.service_account
            && let Some((dir, _)) = self.dirs.get(SERVICE_ACCOUNT_VOLUME)
        {
            binds.push(format!("{}:{SERVICE_ACCOUNT_DIR}:ro", dir.display()));
        }
        binds.push(format!("{}:/etc/resolv.conf", self.resolv_conf.display()));
        Ok(binds)
    }

    fn bind(&self, m: &VolumeMount) -> Result<String, VolumeError> {
        let (dir, vol_ro) = self.dirs.get(&m.name).ok_or_else(|| VolumeError::Undefined(m.name.clone()))?;
        let mut host = dir.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            host = host.join(confined(sub).ok_or_else(|| VolumeError::SubPath(sub.into()))?);
            if !host.exists() {
                make_shared_dir(&host).map_err(|source| VolumeError::Io { volume: m.name.clone(), source })?;
            }
        }
        let ro = m.read_only.unwrap_or(false) || *vol_ro;
        Ok(format!("{}:{}{}", host.display(), m.mount_path, if ro { ":ro" } else { "" }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, ConfigMapVolumeSource, EmptyDirVolumeSource, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn configmap_items_emptydir_and_token() {
        let state = tempfile::tempdir().expect("tempdir");
        let mut src = PodSources::default();
        src.config_maps.insert(
            "cfg".into(),
            ConfigMap {
                data: Some([("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())].into()),
                ..Default::default()
            },
        );
        let container = Container {
            name: "app".into(),
            volume_mounts: Some(vec![
                VolumeMount { name: "cfg".into(), mount_path: "/etc/cfg".into(), ..Default::default() },
                VolumeMount {
                    name: "scratch".into(),
                    mount_path: "/work".into(),
                    sub_path: Some("sub".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let pod = Pod {
            metadata: ObjectMeta { uid: Some("u1".into()), namespace: Some("demo".into()), ..Default::default() },
            spec: Some(PodSpec {
                containers: vec![container.clone()],
                volumes: Some(vec![
                    Volume {
                        name: "cfg".into(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: "cfg".into(),
                            items: Some(vec![KeyToPath {
                                key: "b".into(),
                                path: "dir/b.txt".into(),
                                mode: Some(0o600),
                            }]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    Volume {
                        name: "scratch".into(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sa = ServiceAccountFiles { token: "tok".into(), ca_crt: "ca".into() };
        let vols = prepare(&pod, &src, &sa, state.path()).expect("prepare");
        let binds = vols.binds(&container).expect("binds");
        let vdir = state.path().join("pods/u1/volumes");
        assert_eq!(binds[0], format!("{}:/etc/cfg:ro", vdir.join("cfg").display()));
        assert_eq!(std::fs::read_to_string(vdir.join("cfg/dir/b.txt")).expect("b"), "2");
        assert!(!vdir.join("cfg/a").exists());
        let mode = std::fs::metadata(vdir.join("cfg/dir/b.txt")).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(binds[1], format!("{}:/work", vdir.join("scratch/sub").display()));
        assert_eq!(binds[2], format!("{}:{SERVICE_ACCOUNT_DIR}:ro", vdir.join(SERVICE_ACCOUNT_VOLUME).display()));
        assert_eq!(std::fs::read_to_string(vdir.join(SERVICE_ACCOUNT_VOLUME).join("namespace")).expect("ns"), "demo");
        assert_eq!(binds[3], format!("{}:/etc/resolv.conf", state.path().join("pods/u1/etc/resolv.conf").display()));
    }

    #[test]
    fn fs_group_owns_the_volumes_and_what_is_created_in_them() {
        use k8s_openapi::api::core::v1::{HostPathVolumeSource, PodSecurityContext};
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: giving files to another group takes root, as the kubelet has");
            return;
        }
        let state = tempfile::tempdir().expect("tempdir");
        let host = state.path().join("host");
        let volume = |name: &str| Volume { name: name.into(), ..Default::default() };
        let pod = Pod {
            metadata: ObjectMeta { uid: Some("u2".into()), ..Default::default() },
            spec: Some(PodSpec {
                security_context: Some(PodSecurityContext { fs_group: Some(2000), ..Default::default() }),
                volumes: Some(vec![
                    Volume { empty_dir: Some(EmptyDirVolumeSource::default()), ..volume("scratch") },
                    Volume {
                        host_path: Some(HostPathVolumeSource {
                            path: host.to_string_lossy().into_owned(),
                            type_: Some("DirectoryOrCreate".into()),
                        }),
                        ..volume("host")
                    },
                ]),
                automount_service_account_token: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        prepare(&pod, &PodSources::default(), &ServiceAccountFiles::default(), state.path()).expect("prepare");
        let scratch = std::fs::metadata(state.path().join("pods/u2/volumes/scratch")).expect("scratch");
        assert_eq!((scratch.gid(), scratch.mode() & 0o7777), (2000, 0o2777), "emptyDir: the group's, setgid");
        // The node creates a hostPath as root, 0755, and leaves fsGroup out of it.
        let host = std::fs::metadata(&host).expect("host");
        assert_eq!((host.uid(), host.gid(), host.mode() & 0o7777), (0, 0, 0o755), "hostPath");
    }

    #[test]
    fn paths_cannot_escape() {
        assert!(confined("../x").is_none());
        assert!(confined("/etc/passwd").is_none());
        assert!(confined("a/b").is_some());
    }
}
