//! `tpd connect` / `tpd quit` through the real `tpd` binary against the
//! sandbox cluster: a long-lived session that outlives the command, which
//! any `docker run --network container:<sidecar>` joins; `tpd connect` again
//! shows it; `tpd quit` ends it, restoring the Deployment exactly; and after
//! `kill -9` of the background process, `tpd quit` still cleans up.
//!
//! Each `tpd` runs with its own `XDG_CACHE_HOME`, so the session records
//! and logs live in the test's temporary directory.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tpd_e2e::home::Home;
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, swap_record, user_owned, wait_deployment};

const NS: &str = "default";

/// The test's cache directory; on drop, kills every session process it
/// still records and removes their containers, networks and volumes, so a
/// failing test leaves nothing behind.
struct Sessions {
    home: Home,
}

impl Sessions {
    fn dir(&self) -> PathBuf {
        self.home.cache().join("tpd/connect")
    }

    fn record(&self, name: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir().join(format!("{name}.json"))).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn tpd(&self, sb: &Sandbox, args: &[&str]) -> Output {
        let mut cmd = session::tpd_in(sb, &self.home).unwrap();
        cmd.args(args);
        cmd.output().unwrap()
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(record) =
                std::fs::read_to_string(entry.path()).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok())
            else {
                continue;
            };
            if let Some(pid) = record["pid"].as_u64() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
            }
            let Some(id) = record["id"].as_str() else {
                continue;
            };
            let filter = format!("label={}={id}", tpd_wire::names::LABEL_SESSION);
            for (ls, rm) in [
                (vec!["ps", "-aq"], vec!["rm", "-f"]),
                (vec!["network", "ls", "-q"], vec!["network", "rm"]),
                (vec!["volume", "ls", "-q"], vec!["volume", "rm", "-f"]),
            ] {
                let out = docker(&[&ls[..], &["--filter", &filter]].concat());
                let ids: Vec<&str> = out.split_whitespace().collect();
                if !ids.is_empty() {
                    docker(&[&rm[..], &ids[..]].concat());
                }
            }
        }
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker").args(args).output().is_ok_and(|o| o.status.success())
}

fn said(out: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `tpd connect ARGS`: succeeds and prints the sidecar's name (only) on stdout.
fn connect(sb: &Sandbox, s: &Sessions, args: &[&str]) -> (String, Output) {
    let out = s.tpd(sb, &[&["connect"], args].concat());
    assert!(out.status.success(), "tpd connect {args:?} failed:\n{}", said(&out));
    let sidecar = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        sidecar.starts_with("tpd-sidecar-") && !sidecar.contains('\n'),
        "stdout is the sidecar's name:\n{}",
        said(&out)
    );
    assert!(docker_ok(&["inspect", &sidecar]), "the sidecar {sidecar} runs after tpd connect returned");
    (sidecar, out)
}

/// Everything of session `id` is gone: local containers and network, pods.
fn nothing_left(sb: &Sandbox, id: &str, sidecar: &str) {
    assert!(!docker_ok(&["inspect", sidecar]), "sidecar {sidecar} left behind");
    assert!(session::session_containers(id).unwrap().is_empty(), "containers of session {id} left behind");
    let networks =
        docker(&["network", "ls", "-q", "--filter", &format!("label={}={id}", tpd_wire::names::LABEL_SESSION)]);
    assert_eq!(networks.trim(), "", "network of session {id} left behind");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pods = sb
            .kubectl_ok(&[
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                &format!("{}={id}", tpd_wire::names::LABEL_SESSION),
                "-o",
                "name",
            ])
            .unwrap();
        if pods.trim().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "pods of session {id} left behind: {pods}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn restored(sb: &Sandbox, original: &Value) {
    let (d, _) = wait_deployment(sb, NS, "hello", Duration::from_secs(30), |d| swap_record(d).is_none()).unwrap();
    assert_eq!(&user_owned(d), original, "the restored Deployment differs from the original");
}

fn curl_from_session(sidecar: &str, url: &str) -> String {
    docker(&[
        "run",
        "--rm",
        "--label",
        "tpd.test=1",
        "--network",
        &format!("container:{sidecar}"),
        images::DEBIAN,
        "curl",
        "-s",
        "-m",
        "10",
        url,
    ])
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn connect_and_quit_on_the_sandbox() {
    session::prerequisites().unwrap();
    let sb = Sandbox::up().unwrap();
    let s = Sessions { home: Home::new().unwrap() };
    for name in ["hello", "world"] {
        sb.kubectl_ok(&["create", "deployment", name, "--image", images::ECHO, "--port", "8080"]).unwrap();
        sb.kubectl_ok(&["expose", "deployment", name, "--port", "80", "--target-port", "8080"]).unwrap();
    }
    for name in ["hello", "world"] {
        sb.rolled_out("default", name).unwrap();
    }
    let original = user_owned(session::deployment_json(&sb, NS, "hello").unwrap());

    // Bad input: the error, the log's path, nothing left behind.
    let out = s.tpd(&sb, &["connect", "--name", "bad", "--swap", "deployment/nope"]);
    assert!(!out.status.success(), "{}", said(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("there is no deployment/nope") && err.contains("help:") && err.contains("bad.log"),
        "{}",
        said(&out)
    );
    assert!(s.record("bad").is_none(), "no record for a session that never started");

    // Outbound only, default name: the command returns, the session stays.
    let started = Instant::now();
    let (sidecar, out) = connect(&sb, &s, &[]);
    eprintln!("tpd connect (outbound) returned after {:?}", started.elapsed());
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("agent pod") && progress.contains("is ready"), "progress is shown:\n{progress}");
    let names: Vec<String> = std::fs::read_dir(s.dir())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_owned))
        .collect();
    assert_eq!(names.len(), 1, "one record: {names:?}");
    let name = names[0].clone();
    assert!(name.ends_with("-default"), "the default name is CONTEXT-NAMESPACE: {name}");
    let record = s.record(&name).unwrap();
    assert_eq!(record["sidecar"].as_str(), Some(sidecar.as_str()));
    assert_eq!(mode(&s.dir().join(format!("{name}.json"))), 0o600, "the record holds the remote env");
    let id = record["id"].as_str().unwrap().to_owned();

    let answer = curl_from_session(&sidecar, "http://world.default");
    assert!(
        answer.starts_with("hello from world-"),
        "a container joining the session reaches a cluster service: {answer:?}"
    );

    let again = s.tpd(&sb, &["connect"]);
    assert!(again.status.success(), "{}", said(&again));
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), sidecar, "the same session");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"), "{}", said(&again));
    let status = s.tpd(&sb, &["status", "--output", "json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let listed = status["connect"].as_array().cloned().unwrap_or_default();
    assert!(listed.iter().any(|c| c["name"] == name.as_str() && c["running"] == true), "tpd status lists it: {status}");

    let out = s.tpd(&sb, &["quit"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ended"), "{}", said(&out));
    assert!(s.record(&name).is_none(), "tpd quit removes the record");
    nothing_left(&sb, &id, &sidecar);

    // A swap: a client pod's request to `hello` is served by a container
    // that joined the session; `tpd quit` restores the Deployment exactly.
    let (sidecar, _) = connect(&sb, &s, &["--name", "dev", "--swap", "deployment/hello", "--port", "8080:9000"]);
    let record = s.record("dev").unwrap();
    let id = record["id"].as_str().unwrap().to_owned();
    assert_eq!(record["swaps"][0]["deployment"], "deployment/hello");
    assert_eq!(record["swaps"][0]["local_ports"], serde_json::json!([9000]));
    let serve = "mkdir -p /srv && echo served-locally > /srv/index.html && exec busybox httpd -f -p 9000 -h /srv";
    let server = format!("tpd-e2e-connect-server-{}", std::process::id());
    let ran = docker(&[
        "run",
        "-d",
        "--rm",
        "--label",
        "tpd.test=1",
        "--name",
        &server,
        "--network",
        &format!("container:{sidecar}"),
        images::DEBIAN,
        "sh",
        "-c",
        serve,
    ]);
    assert!(!ran.trim().is_empty(), "the server joined the session");
    let (phase, served) =
        session::run_pod(&sb, "client", images::DEBIAN, &["curl", "-s", "-m", "10", "http://hello"]).unwrap();
    assert_eq!((phase.as_str(), served.trim()), ("Succeeded", "served-locally"), "a client pod calling hello");
    let again = s.tpd(&sb, &["connect", "--name", "dev"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), sidecar, "{}", said(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("swaps deployment/hello"), "{}", said(&again));

    let out = s.tpd(&sb, &["quit", "dev"]);
    assert!(out.status.success(), "{}", said(&out));
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains("restored deployment/hello") && report.contains("deployment/hello is restored"),
        "quit reports the restore:\n{report}"
    );
    restored(&sb, &original);
    docker(&["rm", "-f", &server]);
    nothing_left(&sb, &id, &sidecar);
    assert!(s.record("dev").is_none());

    // kill -9 of the background process: `tpd quit` still cleans up.
    let (sidecar, _) = connect(&sb, &s, &["--name", "killed", "--swap", "deployment/hello"]);
    let record = s.record("killed").unwrap();
    let id = record["id"].as_str().unwrap().to_owned();
    let pid = record["pid"].as_u64().unwrap().to_string();
    assert!(Command::new("kill").args(["-9", &pid]).status().unwrap().success());
    let out = s.tpd(&sb, &["quit", "killed"]);
    assert!(out.status.success(), "{}", said(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is gone; cleaning up"), "{}", said(&out));
    restored(&sb, &original);
    nothing_left(&sb, &id, &sidecar);
    assert!(s.record("killed").is_none(), "the stale record is removed");
    let out = s.tpd(&sb, &["quit", "killed"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no tpd session named \"killed\""),
        "{}",
        said(&out)
    );
}
