//! `tpd compose` through the real `tpd` binary and the installed compose
//! (docker-compose v1 on this machine, `docker compose` v2 where present).
//!
//! The session these tests join is a stand-in: a busybox container on a
//! Docker network of the test's own, described by a session record written
//! as `tpd connect` will write it (docs/compose.md). It has no tunnel, so
//! these tests prove the compose side — the override, `up`, the wiring
//! between the services and the sidecar's namespace, the cleanup and the
//! refusals — and not cluster access, which needs a real session.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tpd_e2e::home::Home;
use tpd_e2e::images;

const TEST_LABEL: &str = "tpd.test.compose";

/// Builds `tpd` once per test process and returns its path.
fn tpd() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "tpd-cli"])
            .current_dir(images::workspace_root())
            .status()
            .expect("running cargo build -p tpd-cli");
        assert!(status.success(), "cargo build -p tpd-cli failed");
        images::target_dir().expect("target dir").join("debug/tpd")
    })
    .clone()
}

fn examples() -> PathBuf {
    images::workspace_root().join("compose-examples")
}

/// The installed compose, as tpd picks it: v2 first, then v1.
fn compose() -> Vec<&'static str> {
    let v2 = Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    if v2 { vec!["docker", "compose"] } else { vec!["docker-compose"] }
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("running docker")
}

/// A stand-in session: network, sidecar container, record. Drop removes the
/// containers and networks it or the test's compose projects created.
struct Session {
    name: String,
    sidecar: String,
    network: String,
    home: Home,
    tag: String,
}

impl Session {
    fn start(swaps: serde_json::Value) -> Result<Self> {
        images::ensure()?;
        let tag = format!("{}-{}", std::process::id(), rand_suffix());
        let (name, sidecar, network) =
            (format!("s{tag}"), format!("tpd-test-sidecar-{tag}"), format!("tpd-test-net-{tag}"));
        let session = Session { name, sidecar, network, home: Home::new()?, tag };
        let labels = ["--label", "tpd.test=1", "--label", &format!("{TEST_LABEL}={}", session.tag)];
        let out = docker(&[&["network", "create"], &labels[..], &[&session.network]].concat());
        anyhow::ensure!(out.status.success(), "network create: {}", String::from_utf8_lossy(&out.stderr));
        let run = [
            &["run", "-d", "--name", &session.sidecar, "--network", &session.network],
            &labels[..],
            &[images::BUSYBOX, "sleep", "600"],
        ]
        .concat();
        let out = docker(&run);
        anyhow::ensure!(out.status.success(), "sidecar: {}", String::from_utf8_lossy(&out.stderr));
        let record = serde_json::json!({
            "name": session.name, "id": session.tag, "context": "test", "namespace": "default",
            "sidecar": session.sidecar, "network": session.network,
            // The process holding a real session; here the test itself, which outlives every use.
            "pid": std::process::id(),
            "swaps": swaps,
        });
        let dir = session.home.cache().join("tpd/connect");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{}.json", session.name)), record.to_string())?;
        Ok(session)
    }

    /// `tpd ARGS` with this session's cache directory.
    fn tpd(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(tpd());
        self.home.apply(&mut cmd).current_dir(dir).stdin(Stdio::null());
        cmd
    }

    /// The files tpd leaves in the cache directory besides the record.
    fn leftovers(&self) -> Vec<String> {
        let dir = self.home.cache().join("tpd/connect");
        let record = format!("{}.json", self.name);
        std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| *n != record).collect())
            .unwrap_or_default()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let filter = format!("label={TEST_LABEL}={}", self.tag);
        let ids = docker(&["ps", "-aq", "--filter", &filter]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            docker(&["rm", "-f", id]);
        }
        docker(&["network", "rm", &self.network]);
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32 % 100_000
}

fn api_swap(local_ports: &[u16]) -> serde_json::Value {
    serde_json::json!({
        "deployment": "deployment/api",
        "env": { "GREETING": "hello from the cluster's $ConfigMap", "QUOTES_URL": "http://quotes", "LOG_LEVEL": "info" },
        "mounts": [], "local_ports": local_ports,
    })
}

/// Containers of a compose project, running or not.
fn project_containers(project: &str) -> Vec<String> {
    let out = docker(&["ps", "-aq", "--filter", &format!("label=com.docker.compose.project={project}")]);
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

/// The running `web` container of the web-api-db example, once compose started it.
fn web_container() -> Option<String> {
    let out = docker(&[
        "ps",
        "-q",
        "--filter",
        "label=com.docker.compose.project=web-api-db",
        "--filter",
        "label=com.docker.compose.service=web",
    ]);
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!id.is_empty()).then_some(id)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn generated_overrides_of_both_examples_pass_compose_config() -> Result<()> {
    let session = Session::start(serde_json::json!([api_swap(&[8080])]))?;
    let cases = [
        ("web-api-db", vec!["--swap", "deployment/api", "--service", "api"], "api"),
        ("worker-outbound", vec!["--outbound", "worker"], "worker"),
    ];
    for (example, choice, moved) in cases {
        let dir = examples().join(example);
        let out = session.tpd(&dir).args(["compose", "generate", "--session", &session.name]).args(&choice).output()?;
        anyhow::ensure!(out.status.success(), "{example}: {}", text(&out));
        let yaml = String::from_utf8(out.stdout)?;
        assert!(yaml.starts_with("# Generated by tpd"), "{example}: the header explains the file:\n{yaml}");
        assert!(yaml.contains(&format!("network_mode: container:{}", session.sidecar)), "{yaml}");
        let file = session.home.path().join(format!("{example}.tpd.yml"));
        std::fs::write(&file, &yaml)?;

        let tool = compose();
        let config = Command::new(tool[0])
            .args(&tool[1..])
            .args(["-f", "docker-compose.yml", "-f"])
            .arg(&file)
            .arg("config")
            .current_dir(&dir)
            .output()?;
        anyhow::ensure!(config.status.success(), "{example}: compose config rejects the override: {}", text(&config));
        let merged = String::from_utf8_lossy(&config.stdout);
        assert!(
            merged.contains(&format!("network_mode: container:{}", session.sidecar)),
            "{moved} joins the sidecar:\n{merged}"
        );
        assert!(merged.contains(&session.network), "the default network is the session's:\n{merged}");
    }
    // The swapped api: the remote env, `$` kept literal, the user's LOG_LEVEL winning.
    let dir = examples().join("web-api-db");
    let out = session
        .tpd(&dir)
        .args(["compose", "generate", "--session", &session.name, "--swap", "deployment/api", "--service", "api"])
        .output()?;
    let yaml = String::from_utf8(out.stdout)?;
    assert!(yaml.contains("GREETING: hello from the cluster's $$ConfigMap"), "{yaml}");
    assert!(!yaml.contains("LOG_LEVEL"), "api/local.env sets LOG_LEVEL, which wins:\n{yaml}");
    assert!(yaml.contains(&format!("- {}:api", session.sidecar)), "web reaches api through the sidecar:\n{yaml}");
    Ok(())
}

/// depends_on, env_file, named volumes and profiles survive the override.
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn compose_features_keep_working_under_the_override() -> Result<()> {
    let session = Session::start(serde_json::json!([]))?;
    let project = tempfile::Builder::new().prefix("tpd-compose-features-").tempdir()?;
    let file = format!(
        "services:\n  \
         app:\n    image: {bb}\n    depends_on: [store]\n    env_file: [app.env]\n    volumes: ['data:/data']\n    profiles: [dev]\n  \
         store:\n    image: {bb}\nvolumes:\n  data: {{}}\n",
        bb = images::BUSYBOX
    );
    std::fs::write(project.path().join("docker-compose.yml"), file)?;
    std::fs::write(project.path().join("app.env"), "FROM_ENV_FILE=yes\n")?;
    let out = session
        .tpd(project.path())
        .args(["compose", "generate", "--session", &session.name, "--outbound", "app"])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", text(&out));
    std::fs::write(project.path().join("tpd.yml"), &out.stdout)?;
    let tool = compose();
    let config = Command::new(tool[0])
        .args(&tool[1..])
        .args(["-f", "docker-compose.yml", "-f", "tpd.yml", "config"])
        .env("COMPOSE_PROFILES", "dev")
        .current_dir(project.path())
        .output()?;
    anyhow::ensure!(config.status.success(), "{}", text(&config));
    let merged = String::from_utf8_lossy(&config.stdout);
    let joined = format!("network_mode: container:{}", session.sidecar);
    // Substrings both compose versions print (their layouts differ).
    for kept in ["FROM_ENV_FILE:", "depends_on:", "store:", "/data", "- dev", "data: {}", &joined] {
        assert!(merged.contains(kept), "{kept:?} missing from the merged project:\n{merged}");
    }
    Ok(())
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn bad_input_is_refused_with_a_fix_and_starts_nothing() -> Result<()> {
    let two_swaps =
        serde_json::json!([api_swap(&[8080]), { "deployment": "deployment/admin", "env": {}, "local_ports": [8080] }]);
    let session = Session::start(two_swaps)?;
    let project = tempfile::Builder::new().prefix("tpd-compose-bad-").tempdir()?;
    let labels = format!("labels: {{{TEST_LABEL}: \"{}\"}}", session.tag);
    let compose_file = format!(
        "services:\n  \
         api: {{image: {bb}, command: [sleep, '30'], {labels}}}\n  \
         admin: {{image: {bb}, command: [sleep, '30'], {labels}}}\n  \
         hostnet: {{image: {bb}, network_mode: host, {labels}}}\n  \
         published: {{image: {bb}, ports: ['18080:8080'], {labels}}}\n",
        bb = images::BUSYBOX
    );
    std::fs::write(project.path().join("docker-compose.yml"), compose_file)?;
    let empty_path = tempfile::tempdir()?;
    let s = session.name.as_str();
    let v1 = compose() == ["docker-compose"];

    let mut cases: Vec<(&str, Vec<&str>, Option<&Path>, &str)> = vec![
        ("unknown service", vec!["--session", s, "--outbound", "nope"], None, "has no service \"nope\""),
        ("network_mode", vec!["--session", s, "--outbound", "hostnet"], None, "already sets `network_mode: host`"),
        (
            "port clash",
            vec![
                "--session",
                s,
                "--swap",
                "deployment/api",
                "--service",
                "api",
                "--swap",
                "deployment/admin",
                "--service",
                "admin",
            ],
            None,
            "both listen on 8080/tcp",
        ),
        ("unknown session", vec!["--session", "nosuch", "--outbound", "api"], None, "no tpd session named \"nosuch\""),
        (
            "swap not in the session",
            vec!["--session", s, "--swap", "deployment/web", "--service", "api"],
            None,
            "does not swap deployment/web",
        ),
        (
            "--swap without --service",
            vec!["--session", s, "--swap", "deployment/api"],
            None,
            "1 --swap but 0 --service",
        ),
        (
            "compose not installed",
            vec!["--session", s, "--outbound", "api"],
            Some(empty_path.path()),
            "neither `docker compose` (v2) nor `docker-compose` (v1)",
        ),
    ];
    if v1 {
        cases.push((
            "ports under v1",
            vec!["--session", s, "--outbound", "published"],
            None,
            "publishes or exposes ports (18080:8080)",
        ));
    }
    for (what, choice, path, expected) in cases {
        let mut cmd = session.tpd(project.path());
        cmd.arg("compose").args(&choice).args(["--", "up"]);
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        let out = cmd.output()?;
        let said = text(&out);
        assert!(!out.status.success(), "{what}: must fail:\n{said}");
        assert!(said.contains(expected), "{what}: expected {expected:?} in:\n{said}");
        assert!(said.contains("help: "), "{what}: names the fix:\n{said}");
    }
    let out = session
        .tpd(project.path())
        .args(["compose", "--session", s, "--outbound", "api", "--", "up", "-d"])
        .output()?;
    assert!(!out.status.success() && text(&out).contains("does not run detached projects"), "{}", text(&out));

    let name = project.path().file_name().and_then(|n| n.to_str()).context("project dir name")?.to_lowercase();
    assert_eq!(project_containers(&name), Vec::<String>::new(), "nothing started");
    assert_eq!(session.leftovers(), Vec::<String>::new(), "no override file left behind");
    Ok(())
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn up_runs_web_api_db_in_the_session_and_takes_it_down_on_ctrl_c() -> Result<()> {
    let session = Session::start(serde_json::json!([api_swap(&[8080])]))?;
    let dir = examples().join("web-api-db");
    let mut up = session.tpd(&dir);
    up.args(["compose", "--session", &session.name, "--swap", "deployment/api", "--service", "api", "--", "up"]);
    // Its own process group, so the test can send Ctrl-C to tpd and compose as a terminal would.
    std::os::unix::process::CommandExt::process_group(&mut up, 0);
    let child = up.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let guard = KillOnDrop(child);
    let result = check_web_api_db(&session);
    let pid = guard.0.id() as i32;
    // SIGINT to the whole group, as Ctrl-C at the terminal.
    Command::new("kill").args(["-INT", "--", &format!("-{pid}")]).status()?;
    let out = wait_with_deadline(guard, Duration::from_secs(60))?;
    let said = text(&out);
    result.with_context(|| format!("tpd compose output:\n{said}"))?;
    assert!(said.contains("down: removing what project web-api-db started"), "{said}");
    assert_eq!(project_containers("web-api-db"), Vec::<String>::new(), "compose down removed the project:\n{said}");
    assert_eq!(session.leftovers(), Vec::<String>::new(), "the override file is removed");
    let sidecar = docker(&["inspect", "-f", "{{.State.Running}}", &session.sidecar]);
    assert_eq!(
        String::from_utf8_lossy(&sidecar.stdout).trim(),
        "true",
        "a `tpd connect` session outlives `tpd compose`"
    );
    Ok(())
}

/// From inside `web`: its CGI calls `api` (in the sidecar's namespace),
/// which calls `db` and reports the env it got.
fn check_web_api_db(session: &Session) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let Some(web) = web_container() else { continue };
        let out = docker(&["exec", &web, "wget", "-qO-", "http://127.0.0.1/cgi-bin/api"]);
        last = text(&out);
        if last.contains("db: hello from") {
            assert!(last.contains("served_by: the local api"), "{last}");
            assert!(
                last.contains("greeting: hello from the cluster's $ConfigMap"),
                "the remote env, literally:\n{last}"
            );
            assert!(last.contains("log_level: debug"), "the user's env_file wins:\n{last}");
            // api listens in the sidecar's namespace.
            let direct = docker(&["exec", &session.sidecar, "wget", "-qO-", "http://127.0.0.1:8080/cgi-bin/hello"]);
            assert!(text(&direct).contains("served_by: the local api"), "{}", text(&direct));
            return Ok(());
        }
    }
    bail!("web never got the api's answer; last: {last}")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_with_deadline(mut guard: KillOnDrop, limit: Duration) -> Result<Output> {
    let deadline = Instant::now() + limit;
    while guard.0.try_wait()?.is_none() {
        if Instant::now() > deadline {
            bail!("tpd compose did not end within {limit:?} of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let child = std::mem::replace(&mut guard.0, Command::new("true").spawn()?);
    Ok(child.wait_with_output()?)
}

// ------------------------------------------------ the examples on the sandbox

/// Kills, on drop, the session processes recorded in a test's cache
/// directory and removes their containers and networks (by session label).
struct RealSessions {
    home: Home,
}

impl RealSessions {
    fn tpd(&self, sb: &tpd_e2e::sandbox::Sandbox, dir: &Path) -> Command {
        let mut cmd = tpd_e2e::session::tpd_in(sb, &self.home).expect("the tpd binary");
        cmd.current_dir(dir);
        cmd
    }
}

impl Drop for RealSessions {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.home.cache().join("tpd/connect")) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(record) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            else {
                continue;
            };
            if let Some(pid) = record["pid"].as_u64() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
            }
            if let Some(id) = record["id"].as_str() {
                remove_session_objects(id);
            }
        }
    }
}

fn remove_session_objects(id: &str) {
    let filter = format!("label={}={id}", tpd_wire::names::LABEL_SESSION);
    for (ls, rm) in [(vec!["ps", "-aq"], vec!["rm", "-f"]), (vec!["network", "ls", "-q"], vec!["network", "rm"])] {
        let out = docker(&[&ls[..], &["--filter", &filter]].concat());
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        if !ids.is_empty() {
            docker(&[rm.clone(), ids.iter().map(String::as_str).collect()].concat());
        }
    }
}

/// Both compose-examples through a real tunnel: web-api-db's `api` replaces
/// deployment/api on a `tpd connect` session (a client pod reaches it; it
/// reaches the cluster's `quotes` and the local `db`), and the worker runs
/// on a session `tpd compose` starts and ends itself.
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn examples_run_on_the_sandbox_through_the_tunnel() -> Result<()> {
    use tpd_e2e::sandbox::Sandbox;
    use tpd_e2e::session::{self as s, swap_record, user_owned, wait_deployment};
    s::prerequisites()?;
    let sb = Sandbox::up()?;
    let sessions = RealSessions { home: Home::new()? };
    sb.kubectl_ok(&["apply", "-f", &examples().join("k8s").to_string_lossy()])?;
    for d in ["quotes", "api"] {
        sb.rolled_out("default", d)?;
    }
    let original = user_owned(s::deployment_json(&sb, "default", "api")?);

    // web-api-db on a `tpd connect` session that swaps deployment/api.
    let web_api_db = examples().join("web-api-db");
    let out = sessions.tpd(&sb, &web_api_db).args(["connect", "--name", "dev", "--swap", "deployment/api"]).output()?;
    anyhow::ensure!(out.status.success(), "tpd connect: {}", text(&out));
    let sidecar = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let generated = sessions
        .tpd(&sb, &web_api_db)
        .args(["compose", "generate", "--session", "dev", "--swap", "deployment/api", "--service", "api"])
        .output()?;
    anyhow::ensure!(generated.status.success(), "generate: {}", text(&generated));
    let yaml = String::from_utf8_lossy(&generated.stdout);
    assert!(
        yaml.contains(&format!("network_mode: container:{sidecar}"))
            && yaml.contains("GREETING: hello from the cluster's ConfigMap"),
        "{yaml}"
    );

    let mut up = sessions.tpd(&sb, &web_api_db);
    up.args(["compose", "--session", "dev", "--swap", "deployment/api", "--service", "api", "--", "up"]);
    std::os::unix::process::CommandExt::process_group(&mut up, 0);
    let guard = KillOnDrop(up.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?);
    let checked = check_web_api_db_through_the_tunnel(&sb);
    Command::new("kill").args(["-INT", "--", &format!("-{}", guard.0.id())]).status()?;
    let out = wait_with_deadline(guard, Duration::from_secs(60))?;
    checked.with_context(|| format!("tpd compose output:\n{}", text(&out)))?;
    assert_eq!(
        project_containers("web-api-db"),
        Vec::<String>::new(),
        "compose down removed the project:\n{}",
        text(&out)
    );

    let quit = sessions.tpd(&sb, &web_api_db).args(["quit", "dev"]).output()?;
    anyhow::ensure!(quit.status.success(), "tpd quit: {}", text(&quit));
    assert!(text(&quit).contains("deployment/api is restored"), "{}", text(&quit));
    let (d, _) = wait_deployment(&sb, "default", "api", Duration::from_secs(30), |d| swap_record(d).is_none())?;
    assert_eq!(user_owned(d), original, "deployment/api is as it was");

    // worker-outbound on a session of its own, started and ended by `tpd
    // compose`, on a machine where `tpd connect` never ran.
    let worker = examples().join("worker-outbound");
    let fresh = RealSessions { home: Home::new()? };
    let mut up = fresh.tpd(&sb, &worker);
    up.args(["compose", "--outbound", "worker", "--", "up", "--abort-on-container-exit"]);
    let out = up.stdin(Stdio::null()).output()?;
    let said = text(&out);
    assert!(said.contains("worker: round 3: hello from quotes-") && said.contains("worker: done"), "{said}");
    assert!(said.contains("ending the session of project worker-outbound"), "{said}");
    let own =
        said.split("(sidecar ").nth(1).and_then(|r| r.split(')').next()).context("the sidecar's name in the output")?;
    assert!(docker(&["inspect", own]).status.code() != Some(0), "the project's own session is gone: {own}");
    assert_eq!(project_containers("worker-outbound"), Vec::<String>::new());
    let left = sb.kubectl_ok(&["get", "pods", "-l", "app.kubernetes.io/managed-by=tpd", "-o", "name"])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left = left;
    while !left.trim().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        left = sb.kubectl_ok(&["get", "pods", "-l", "app.kubernetes.io/managed-by=tpd", "-o", "name"])?;
    }
    assert_eq!(left.trim(), "", "no agent pod left");
    Ok(())
}

/// From inside `web`, and from a client pod in the cluster.
fn check_web_api_db_through_the_tunnel(sb: &tpd_e2e::sandbox::Sandbox) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    loop {
        anyhow::ensure!(Instant::now() < deadline, "web never got the api's full answer; last: {last}");
        std::thread::sleep(Duration::from_millis(500));
        let Some(web) = web_container() else { continue };
        last = text(&docker(&["exec", &web, "wget", "-qO-", "http://127.0.0.1/cgi-bin/api"]));
        if last.contains("db: hello from") && last.contains("quotes: hello from quotes-") {
            break;
        }
    }
    for expected in ["served_by: the local api", "greeting: hello from the cluster's ConfigMap", "log_level: debug"] {
        assert!(last.contains(expected), "{expected:?} in:\n{last}");
    }
    let (phase, served) = tpd_e2e::session::run_pod(
        sb,
        "client",
        images::DEBIAN,
        &["curl", "-s", "-m", "10", "http://api/cgi-bin/hello"],
    )?;
    assert_eq!(phase, "Succeeded", "{served}");
    assert!(
        served.contains("served_by: the local api"),
        "a client pod's request to api reaches the local api:\n{served}"
    );
    Ok(())
}
