//! The volume bridge with real containers: the agent (uid 65532, no
//! capabilities, read-only root) serving a configMap-like, a secret-like and
//! an emptyDir-like volume at their paths; the sidecar FUSE-mounting them;
//! the developer's container seeing them at their paths and under TPD_ROOT
//! with the mounts the CLI plans. A private network stands in for the
//! tunnel (see tpd_e2e::volumes).
//!
//! The test binary plays the agent and the sidecar itself inside
//! `tpd-test/debian` (see `container_role`).

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tpd_e2e::volumes::{self, DockerGuard, MOUNTED, ROLE_ENV, SERVER_ENV, docker, exec, mount_flag};
use tpd_wire::files::{self, VolumeMount};

/// Not a test: the entry point of the agent and sidecar containers, which
/// run this binary with `TPD_VOLUMES_ROLE` set.
#[test]
#[ignore = "runs inside the test's containers"]
fn container_role() {
    if let Some(result) = volumes::run_role() {
        result.expect("role failed");
    }
}

const AGENT_UID: u32 = tpd_wire::names::AGENT_UID;

struct Pod {
    dir: tempfile::TempDir,
    volumes: Vec<VolumeMount>,
}

impl Pod {
    fn host(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What the kubelet would have put in the pod's volumes: a configMap with
/// its `..data` symlinks, a secret, and an emptyDir an init container filled.
fn pod_volumes() -> Pod {
    let dir = tempfile::Builder::new().prefix("tpd-vol-pod").tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ts = root.join("config/..2026_11_22_03_00_00.1");
    std::fs::create_dir_all(&ts).expect("mkdir");
    std::fs::write(ts.join("app.yaml"), "level: debug\n").expect("write");
    std::os::unix::fs::symlink("..2026_11_22_03_00_00.1", root.join("config/..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/app.yaml", root.join("config/app.yaml")).expect("symlink");
    std::fs::create_dir(root.join("secret")).expect("mkdir");
    std::fs::write(root.join("secret/token"), "tok-123").expect("write");
    std::fs::create_dir(root.join("data")).expect("mkdir");
    std::fs::write(root.join("data/from-init"), "written by init\n").expect("write");
    // An attempt to lead the developer out of the volume into the pod.
    std::os::unix::fs::symlink("../../etc/passwd", root.join("data/escape")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", root.join("data/abs-escape")).expect("symlink");
    rustix::fs::chown(root.join("data"), Some(rustix::fs::Uid::from_raw(AGENT_UID)), None).expect("chown");
    rustix::fs::chown(root.join("data/from-init"), Some(rustix::fs::Uid::from_raw(AGENT_UID)), None).expect("chown");
    let vm = |name: &str, path: &str, read_only| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only,
        sub_path: None,
    };
    let volumes =
        vec![vm("config", "/etc/config", true), vm("token", "/var/run/secrets/tpd", true), vm("data", "/data", false)];
    Pod { dir, volumes }
}

struct Session {
    guard: DockerGuard,
    agent: String,
    sidecar_args: Vec<String>,
    app: String,
    shared: PathBuf,
    root: String,
}

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").subsec_nanos();
    format!("tpd-vol-{what}-{}-{nanos:x}", std::process::id())
}

fn labels() -> [&'static str; 4] {
    ["--label", "tpd.test=1", "--label", "tpd.test.volumes=1"]
}

fn wait_for_log(container: &str, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let logs = std::process::Command::new("docker").args(["logs", container]).output().expect("docker logs");
        let text = format!("{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
        if text.contains(needle) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{container} never printed {needle:?}:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn is_mounted(p: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    table.lines().any(|l| l.split(' ').nth(4) == p.to_str())
}

/// Starts agent, sidecar and the developer's container for `pod`.
fn start(pod: &Pod) -> Session {
    tpd_e2e::images::ensure().expect("test images");
    let mut guard = DockerGuard::default();
    let me = std::env::current_exe().expect("test binary");
    let me = me.to_str().expect("utf8 path");

    let net = unique("net");
    docker(&["network", "create", "--internal", labels()[0], labels()[1], labels()[2], labels()[3], &net])
        .expect("network");
    guard.networks.push(net.clone());

    // The agent, as restricted as in a pod, with the volumes at their paths.
    let agent = unique("agent");
    let env = format!("{}={}", tpd_wire::names::agent_env::MOUNTS, files::mounts_env_value(&pod.volumes));
    let mut args: Vec<String> = ["run", "-d", "--name", &agent, "--network", &net, "--network-alias", "agent"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(labels().iter().map(|s| s.to_string()));
    args.extend(["--user".into(), AGENT_UID.to_string(), "--cap-drop".into(), "ALL".into(), "--read-only".into()]);
    args.extend(["-e".into(), env, "-e".into(), format!("{ROLE_ENV}=agent")]);
    args.extend(["-v".into(), format!("{me}:/tpd-test:ro")]);
    for (v, host) in pod.volumes.iter().zip(["config", "secret", "data"]) {
        let ro = if v.read_only { ":ro" } else { "" };
        args.extend(["-v".into(), format!("{}:{}{ro}", pod.host(host).display(), v.mount_path)]);
    }
    args.extend([tpd_e2e::images::DEBIAN.into(), "/tpd-test".into(), "container_role".into()]);
    args.extend(["--exact".into(), "--ignored".into(), "--nocapture".into()]);
    guard.containers.push(agent.clone());
    docker(&args.iter().map(String::as_str).collect::<Vec<_>>()).expect("agent container");

    // The host directory the sidecar mounts into: a Docker volume's, which a
    // non-root CLI can get on a shared mount (see cli/src/mounts.rs).
    let vol = unique("shared");
    docker(&["volume", "create", labels()[0], labels()[1], &vol]).expect("volume");
    guard.volumes.push(vol.clone());
    let shared = PathBuf::from(docker(&["volume", "inspect", "-f", "{{.Mountpoint}}", &vol]).expect("inspect"));
    guard.mount_dirs.push(shared.clone());
    let root = "/tpd/remote".to_owned();
    let plan = tpd::mounts::plan(shared.to_str().expect("utf8"), &pod.volumes, &root);

    let sidecar_args = {
        let mut a: Vec<String> = labels().iter().map(|s| s.to_string()).collect();
        a.extend(["--network".into(), net.clone(), "--cap-add".into(), "SYS_ADMIN".into()]);
        a.extend(["--device".into(), "/dev/fuse".into(), "--security-opt".into(), "apparmor=unconfined".into()]);
        a.extend(["-e".into(), format!("{SERVER_ENV}=agent:{}", tpd_wire::names::AGENT_FILES_PORT)]);
        a.extend(["-v".into(), format!("{me}:/tpd-test:ro")]);
        for m in &plan.sidecar {
            a.extend(["--mount".into(), mount_flag(m)]);
        }
        a
    };
    let sidecar = run_sidecar(&mut guard, &sidecar_args, "sidecar");
    wait_for_log(&sidecar, MOUNTED);

    // The developer's container: no privilege, just the planned binds.
    let app = unique("app");
    let mut a: Vec<String> = ["run", "-d", "--name", &app].iter().map(|s| s.to_string()).collect();
    a.extend(labels().iter().map(|s| s.to_string()));
    a.extend(["-e".into(), format!("{}={}", plan.env.0, plan.env.1)]);
    for m in &plan.app {
        a.extend(["--mount".into(), mount_flag(m)]);
    }
    a.extend([tpd_e2e::images::BUSYBOX.into(), "sleep".into(), "600".into()]);
    guard.containers.push(app.clone());
    docker(&a.iter().map(String::as_str).collect::<Vec<_>>()).expect("app container");
    Session { guard, agent, sidecar_args, app, shared, root }
}

fn run_sidecar(guard: &mut DockerGuard, base: &[String], role: &str) -> String {
    let name = unique(role);
    let mut a: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.clone()];
    a.extend(base.iter().cloned());
    a.extend(["-e".into(), format!("{ROLE_ENV}={role}")]);
    a.extend([tpd_e2e::images::DEBIAN.into(), "/tpd-test".into(), "container_role".into()]);
    a.extend(["--exact".into(), "--ignored".into(), "--nocapture".into()]);
    guard.containers.push(name.clone());
    docker(&a.iter().map(String::as_str).collect::<Vec<_>>()).expect("sidecar container");
    name
}

fn sh(c: &str, script: &str) -> String {
    let r = exec(c, None, script);
    assert!(r.ok, "`{script}` failed in {c}: {}", r.stderr);
    r.stdout
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn volumes_reach_the_developers_container() {
    let pod = pod_volumes();
    let s = start(&pod);
    let (app, agent, root) = (&s.app, &s.agent, &s.root);

    // configMap (through its ..data symlinks), secret and emptyDir at their paths and under TPD_ROOT.
    assert_eq!(sh(app, "cat /etc/config/app.yaml"), "level: debug");
    assert_eq!(sh(app, "cat $TPD_ROOT/etc/config/app.yaml"), "level: debug");
    assert_eq!(sh(app, "echo $TPD_ROOT"), *root);
    assert_eq!(sh(app, "cat /var/run/secrets/tpd/token"), "tok-123");
    assert_eq!(sh(app, &format!("cat {root}/var/run/secrets/tpd/token")), "tok-123");
    assert_eq!(sh(app, "cat /data/from-init"), "written by init");
    // A non-root user of the developer's container reads them too.
    assert_eq!(exec(app, Some("1000"), "cat /etc/config/app.yaml").stdout, "level: debug");

    // Written locally, read in the pod; written in the pod, read locally.
    sh(app, "echo from-laptop > /data/local.txt");
    assert_eq!(sh(agent, "cat /data/local.txt"), "from-laptop");
    assert_eq!(std::fs::read_to_string(pod.host("data/local.txt")).expect("host"), "from-laptop\n");
    sh(agent, "echo from-pod > /data/pod.txt");
    assert_eq!(sh(app, "cat /data/pod.txt"), "from-pod");
    sh(agent, "echo changed > /data/pod.txt");
    std::thread::sleep(files_ttl());
    assert_eq!(sh(app, "cat /data/pod.txt"), "changed", "a change in the pod shows once reported");
    sh(app, "mkdir /data/dir && mv /data/local.txt /data/dir/ && ls /data/dir");
    assert_eq!(sh(agent, "ls /data/dir"), "local.txt");

    // 256 MiB both ways, same sha256 on both sides.
    sh(app, "dd if=/dev/urandom of=/data/big-local bs=1M count=256 2>/dev/null");
    let local = sh(app, "sha256sum /data/big-local | cut -d' ' -f1");
    assert_eq!(sh(agent, "sha256sum /data/big-local | cut -d' ' -f1"), local);
    sh(agent, "head -c 268435456 /dev/urandom > /data/big-pod");
    let remote = sh(agent, "sha256sum /data/big-pod | cut -d' ' -f1");
    assert_eq!(sh(app, "sha256sum /data/big-pod | cut -d' ' -f1"), remote);
    sh(app, "rm /data/big-local /data/big-pod");

    // Symlinks leading out of the volume are refused, not followed into the pod.
    for link in ["/data/escape", "/data/abs-escape"] {
        let r = exec(app, None, &format!("cat {link}"));
        assert!(!r.ok && r.stderr.contains("Permission denied"), "{link}: {r:?}");
    }
    let r = exec(app, None, "ln -s /etc /data/evil");
    assert!(!r.ok && r.stderr.contains("Permission denied"), "absolute symlink made: {r:?}");

    // readOnly volumes refuse writes with EROFS.
    for script in ["echo x > /etc/config/new", "echo x > /etc/config/app.yaml", "rm /var/run/secrets/tpd/token"] {
        let r = exec(app, None, script);
        assert!(!r.ok && r.stderr.contains("Read-only file system"), "{script}: {r:?}");
    }
    assert_eq!(std::fs::read_to_string(pod.host("secret/token")).expect("host"), "tok-123");
}

/// How long a change made in the pod may take to show locally: the
/// agent's change report (docs/volumes.md, "Cache lifetimes"), with a wide
/// margin for a busy machine.
fn files_ttl() -> std::time::Duration {
    std::time::Duration::from_millis(1500)
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn traversal_on_the_wire_is_refused() {
    let pod = pod_volumes();
    let s = start(&pod);
    let ip =
        docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &s.agent]).expect("ip");
    let mut conn = std::net::TcpStream::connect((ip.as_str(), tpd_wire::names::AGENT_FILES_PORT)).expect("connect");
    let mut call = |id: u64, req: files::Request| {
        let mut out = bytes::BytesMut::new();
        files::encode(id, &req, &mut out);
        conn.write_all(&out).expect("write");
        let mut buf = bytes::BytesMut::new();
        loop {
            if let Some((got, resp)) = files::decode::<files::Response>(&mut buf).expect("decodes") {
                assert_eq!(got, id);
                return resp;
            }
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).expect("read");
            assert!(n > 0, "agent closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    assert!(matches!(
        call(1, files::Request::Hello { version: files::FILES_VERSION }),
        files::Response::Welcome { .. }
    ));
    for (id, path) in [(2, "../../etc/passwd"), (3, "/etc/passwd"), (4, "x/../../etc")] {
        let resp = call(id, files::Request::Stat { mount: 2, path: path.as_bytes().to_vec() });
        assert_eq!(resp, files::Response::Error(files::EACCES), "{path}");
    }
    let open = call(5, files::Request::Open { mount: 2, path: b"escape".to_vec(), flags: 0 });
    assert_eq!(open, files::Response::Error(40), "ELOOP: a symlink is never opened");
    drop(s);
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn no_mount_is_left_after_the_sidecar_stops_or_is_killed() {
    let pod = pod_volumes();
    let mut s = start(&pod);
    let first = s.shared.join(files::mount_dir_name(0, "config"));
    let sidecar = s.guard.containers[1].clone();
    assert!(is_mounted(&first), "the sidecar's mount shows on the host");

    // A stopped sidecar (what tpd's cleanup does, even after kill -9 of tpd) unmounts.
    docker(&["stop", "-t", "10", &sidecar]).expect("stop");
    wait_for_log(&sidecar, "tpd-volumes: unmounted");
    assert!(!is_mounted(&first), "stopping the sidecar unmounts on the host");

    // A SIGKILLed sidecar leaves dead mounts; the cleanup helper removes them.
    let again = run_sidecar(&mut s.guard, &s.sidecar_args, "sidecar");
    wait_for_log(&again, MOUNTED);
    assert!(is_mounted(&first));
    docker(&["kill", "-s", "KILL", &again]).expect("kill");
    let dead = exec(&s.app, None, "cat /etc/config/app.yaml");
    assert!(!dead.ok, "a killed sidecar's mount is dead: {dead:?}");
    let clean = run_sidecar(&mut s.guard, &s.sidecar_args, "clean");
    wait_for_log(&clean, "leftover mounts");
    assert!(!is_mounted(&first), "the cleanup helper removed the dead mount on the host");
}

/// The real thing: the `tpd/agent` and `tpd/sidecar` images, the sidecar's
/// FUSE client reaching the agent's file service through the WireGuard
/// tunnel (stream transport over TCP), the developer's container with the
/// CLI's planned mounts; 256 MiB each way with matching sha256. Needs
/// `cargo xtask images` (`TPD_AGENT_IMAGE`/`TPD_SIDECAR_IMAGE` choose others).
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn volumes_through_the_tunnel() {
    let pod = pod_volumes();
    tpd_e2e::images::ensure().expect("test images");
    let image = |var: &str, repo: &str| std::env::var(var).unwrap_or_else(|_| format!("{repo}:{}", tpd_wire::VERSION));
    let (agent_image, sidecar_image) = (
        image("TPD_AGENT_IMAGE", tpd_wire::names::AGENT_IMAGE_REPO),
        image("TPD_SIDECAR_IMAGE", tpd_wire::names::SIDECAR_IMAGE_REPO),
    );
    let served: Vec<(PathBuf, VolumeMount)> =
        ["config", "secret", "data"].iter().map(|h| pod.host(h)).zip(pod.volumes.iter().cloned()).collect();
    let mut tunnel = volumes::TunnelMount::start(&served, &agent_image, &sidecar_image)
        .expect("agent and sidecar (run `cargo xtask images`)");
    let plan = tpd::mounts::plan(&tunnel.shared.to_string_lossy(), &pod.volumes, "/tpd/remote");

    let app = unique("tapp");
    let mut d: Vec<String> = ["run", "-d", "--name", &app].iter().map(|s| s.to_string()).collect();
    d.extend(labels().iter().map(|s| s.to_string()));
    d.extend(["-e".into(), format!("{}={}", plan.env.0, plan.env.1)]);
    for m in &plan.app {
        d.extend(["--mount".into(), mount_flag(m)]);
    }
    d.extend([tpd_e2e::images::DEBIAN.into(), "sleep".into(), "600".into()]);
    tunnel.guard.containers.push(app.clone());
    docker(&d.iter().map(String::as_str).collect::<Vec<_>>()).expect("app");

    assert_eq!(sh(&app, "cat /etc/config/app.yaml"), "level: debug");
    assert_eq!(sh(&app, "cat $TPD_ROOT/var/run/secrets/tpd/token"), "tok-123");
    assert_eq!(sh(&app, "cat /data/from-init"), "written by init");
    // The sidecar widened each mount's readahead past the kernel's 128 KiB
    // from inside its container, where /sys is read-only.
    for path in &tunnel.paths {
        assert_eq!(read_ahead_kb(path), tpd_volumes::fuse::READ_AHEAD_KB.to_string(), "{}", path.display());
    }
    // It lifted the read-only flag of its namespace's sysfs for that write
    // only: /sys is read-only again, for the mount and its superblock.
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &tunnel.sidecar]).expect("sidecar pid");
    let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("sidecar mountinfo");
    let sys = table.lines().find(|l| l.split(' ').nth(4) == Some("/sys")).expect("/sys in the sidecar");
    let (mount_options, super_options) = (sys.split(' ').nth(5), sys.rsplit(' ').next());
    assert!(
        mount_options.is_some_and(|o| o.starts_with("ro,")) && super_options.is_some_and(|o| o.starts_with("ro")),
        "{sys}"
    );
    sh(&app, "echo through-the-tunnel > /data/t.txt");
    assert_eq!(std::fs::read_to_string(pod.host("data/t.txt")).expect("pod side"), "through-the-tunnel\n");
    std::fs::write(pod.host("data/p.txt"), "from the pod").expect("write");
    assert_eq!(sh(&app, "cat /data/p.txt"), "from the pod");

    // 256 MiB each way through the tunnel, the same sha256 on both sides
    // (the read-back once hung with the ipstack agent, before 8b1bd7f).
    // Bounded: `timeout` ends a stalled transfer and the test fails.
    let local = sh(&app, "head -c 268435456 /dev/urandom > /tmp/big && sha256sum /tmp/big | cut -d' ' -f1");
    let started = std::time::Instant::now();
    sh(&app, "timeout 300 cp /tmp/big /data/big");
    let wrote = started.elapsed();
    assert_eq!(
        local,
        sha256_hex(&std::fs::read(pod.host("data/big")).expect("pod side")),
        "256 MiB written locally, read in the pod"
    );
    let big = (0..256u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<u8>>();
    std::fs::write(pod.host("data/big-pod"), &big).expect("write");
    let started = std::time::Instant::now();
    let read_back = sh(&app, "timeout 300 sha256sum /data/big-pod | cut -d' ' -f1");
    let read = started.elapsed();
    assert_eq!(read_back, sha256_hex(&big), "256 MiB written in the pod, read locally");
    let rate = |d: std::time::Duration| 256.0 / d.as_secs_f64();
    eprintln!(
        "256 MiB through the tunnel: write {wrote:.1?} ({:.0} MiB/s), read {read:.1?} ({:.0} MiB/s)",
        rate(wrote),
        rate(read)
    );

    let r = exec(&app, None, "cat /data/escape");
    assert!(!r.ok && r.stderr.contains("Permission denied"), "{r:?}");
    let r = exec(&app, None, "echo x > /etc/config/new");
    assert!(!r.ok && r.stderr.contains("Read-only file system"), "{r:?}");

    // Stopping the sidecar (tpd's cleanup) takes the mounts away everywhere.
    let first = tunnel.paths[0].clone();
    assert!(is_mounted(&first));
    docker(&["stop", "-t", "10", &tunnel.sidecar]).expect("stop");
    assert!(!is_mounted(&first), "stopping the sidecar unmounts on the host");
}

/// The host's readahead window of the FUSE mount at `path`, from its device's sysfs entry.
fn read_ahead_kb(path: &Path) -> String {
    let device = std::fs::metadata(path).expect("stat the mount").dev();
    let (major, minor) = (rustix::fs::major(device), rustix::fs::minor(device));
    std::fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
        .expect("read_ahead_kb")
        .trim()
        .into()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}
