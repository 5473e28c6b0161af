//! `tpd run --swap` through the real `tpd` binary against the sandbox
//! cluster: bad input is refused before anything changes; a swapped
//! Deployment is held (a second swap is refused naming the holder, `tpd
//! status` shows it); `kill -9` of tpd is repaired by its guardian within
//! 10 s with no local container left; `tpd restore` ends a session by hand;
//! and after each of these the Deployment equals the original except for
//! the fields the API server owns.
//!
//! Everything runs on the real images (`cargo xtask images`): the agent in
//! the pod, the sidecar and the developer's container locally. One sandbox
//! instance serves every step (one instance per machine).

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, Cleanup, swap_record, tpd_output, tpd_spawn, user_owned, wait_deployment};

const NS: &str = "default";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tpd ARGS` fails, says `expect`, and leaves the Deployment as it was.
fn refused(sb: &Sandbox, args: &[&str], expect: &str, original: &Value) {
    let out = tpd_output(sb, args).unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "tpd {args:?} should fail; stderr: {err}");
    assert!(err.contains(expect), "tpd {args:?}: expected {expect:?} in:\n{err}");
    assert!(err.contains("help:"), "tpd {args:?}: no help line in:\n{err}");
    assert!(!err.contains("backtrace") && !err.contains("caused by"), "tpd {args:?}: one line and a help line:\n{err}");
    let now = user_owned(session::deployment_json(sb, NS, "hello").unwrap());
    assert_eq!(&now, original, "tpd {args:?} changed the Deployment");
}

/// Starts a session that holds deployment/hello, and waits until it is swapped.
fn hold(sb: &Sandbox, cleanup: &mut Cleanup) -> (Child, Value) {
    let mut child =
        tpd_spawn(sb, &["run", "--image", images::DEBIAN, "--swap", "deployment/hello", "--", "sleep", "600"]).unwrap();
    let d = match wait_deployment(sb, NS, "hello", Duration::from_secs(90), |d| swap_record(d).is_some()) {
        Ok((d, _)) => d,
        Err(e) => {
            let _ = child.kill();
            panic!("{e:#}\ntpd said:\n{}", stderr(&child.wait_with_output().unwrap()))
        }
    };
    let record = swap_record(&d).unwrap();
    cleanup.sessions.push(record["session"].as_str().unwrap().to_owned());
    (child, record)
}

fn restored(sb: &Sandbox, original: &Value, timeout: Duration) -> Duration {
    let (d, took) = wait_deployment(sb, NS, "hello", timeout, |d| swap_record(d).is_none()).unwrap();
    assert_eq!(&user_owned(d), original, "the restored Deployment differs from the original");
    took
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn swap_lifecycle_on_the_sandbox() {
    session::prerequisites().unwrap();
    let sb = Sandbox::up().unwrap();
    let mut cleanup = Cleanup::default();
    sb.kubectl_ok(&["create", "deployment", "hello", "--image", images::ECHO, "--port", "8080"]).unwrap();
    sb.kubectl_ok(&["expose", "deployment", "hello", "--port", "80", "--target-port", "8080"]).unwrap();
    sb.rolled_out("default", "hello").unwrap();
    let original = user_owned(session::deployment_json(&sb, NS, "hello").unwrap());

    // Bad input: a clear message, non-zero exit, nothing changed.
    let run = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["run", "--image", images::BUSYBOX];
        args.extend_from_slice(extra);
        args
    };
    refused(
        &sb,
        &run(&["--swap", "deployment/nope"]),
        "there is no deployment/nope in namespace \"default\"",
        &original,
    );
    refused(
        &sb,
        &run(&["--swap", "deployment/hello", "-n", "nope-ns"]),
        "namespace \"nope-ns\" does not exist",
        &original,
    );
    refused(
        &sb,
        &run(&["--swap", "deployment/hello", "--context", "nope"]),
        "the kubeconfig has no context named \"nope\"",
        &original,
    );
    refused(
        &sb,
        &["run", "--image", "tpd-test/absent:1", "--swap", "deployment/hello"],
        "the image tpd-test/absent:1 is not in the local Docker engine",
        &original,
    );
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = format!("{}:80", taken.local_addr().unwrap().port());
    let port: &'static str = Box::leak(port.into_boxed_str());
    refused(&sb, &run(&["--swap", "deployment/hello", "-p", port]), "is not available", &original);
    let out = session::tpd(&sb)
        .unwrap()
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .args(run(&["--swap", "deployment/hello"]))
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("Docker is not reachable"), "{}", stderr(&out));
    // A bare OS error gets its context and a help line, and no backtrace.
    refused(
        &sb,
        &run(&["--swap", "deployment/hello", "--env-file", "/nonexistent/app.env"]),
        "/nonexistent/app.env",
        &original,
    );
    sb.kubectl_ok(&["create", "deployment", "pair", "--image", images::ECHO, "--image", images::BUSYBOX]).unwrap();
    refused(&sb, &run(&["--swap", "deployment/pair"]), "has 2 containers", &original);

    // A held swap: the record names the holder; a second swap is refused
    // naming it; `tpd status` lists it.
    let (first, record) = hold(&sb, &mut cleanup);
    let holder = record["holder"].as_str().unwrap().to_owned();
    assert!(holder.contains('@'), "holder is user@host: {holder}");
    refused_while_swapped(&sb, &holder);
    let status = tpd_output(&sb, &["status", "--output", "json"]).unwrap();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    let swaps = status["swaps"].as_array().unwrap();
    assert_eq!(swaps.len(), 1, "{status}");
    assert_eq!(
        (swaps[0]["deployment"].as_str(), swaps[0]["holder"].as_str(), swaps[0]["lease_live"].as_bool()),
        (Some("hello"), Some(holder.as_str()), Some(true))
    );

    // kill -9 of tpd: the guardian restores within 10 s and removes the
    // session's containers.
    let session_id = record["session"].as_str().unwrap().to_owned();
    let mut first = first;
    first.kill().unwrap();
    let status = first.wait().unwrap();
    assert_eq!(status.signal(), Some(9));
    let took = restored(&sb, &original, Duration::from_secs(10));
    eprintln!("kill -9: restored after {took:?}");
    assert!(
        session::session_containers(&session_id).unwrap().is_empty(),
        "containers of session {session_id} left behind\n{}",
        session::session_logs(&sb, &session_id)
    );

    // `tpd restore` by hand ends a live session: its next renewal fails and
    // it exits, cleaning up.
    let (mut second, _) = hold(&sb, &mut cleanup);
    let out = tpd_output(&sb, &["restore", "deployment/hello"]).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored deployment/hello"));
    restored(&sb, &original, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(20);
    while second.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the session did not end after its swap was restored by hand");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = second.wait_with_output().unwrap();
    assert!(stderr(&out).contains("lost the swap of deployment/hello"), "{}", stderr(&out));
    assert_eq!(user_owned(session::deployment_json(&sb, NS, "hello").unwrap()), original);

    // The seed walkthrough (the client pod uses curl: the static busybox's
    // wget crashes resolving names in a scratch image): a client pod's request to `hello` is served by
    // the local container; the local container reaches another service by
    // its short and full names; after Ctrl-C the echo answers again.
    sb.kubectl_ok(&["create", "deployment", "world", "--image", images::ECHO, "--port", "8080"]).unwrap();
    sb.kubectl_ok(&["expose", "deployment", "world", "--port", "80", "--target-port", "8080"]).unwrap();
    sb.rolled_out("default", "world").unwrap();
    let dev = format!("tpd-e2e-walk-{}", std::process::id());
    let serve = "mkdir -p /srv && echo served-locally > /srv/index.html && exec busybox httpd -f -p 9000 -h /srv";
    let started = Instant::now();
    let walk = tpd_spawn(
        &sb,
        &[
            "run",
            "--image",
            images::DEBIAN,
            "--name",
            &dev,
            "--swap",
            "deployment/hello",
            "--port",
            "8080:9000",
            "--",
            "sh",
            "-c",
            serve,
        ],
    )
    .unwrap();
    let walk_pid = walk.id();
    cleanup.children.push(walk);
    while !docker_ok(&["exec", &dev, "true"]) {
        assert!(started.elapsed() < Duration::from_secs(60), "the developer's container never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let record = swap_record(&session::deployment_json(&sb, NS, "hello").unwrap()).unwrap();
    cleanup.sessions.push(record["session"].as_str().unwrap().to_owned());
    for name in ["world", "world.default", "world.default.svc.cluster.local"] {
        let out = docker_out(&["exec", &dev, "curl", "-s", "-m", "10", &format!("http://{name}/")]);
        assert!(out.starts_with("hello from world-"), "curl {name} from the local container: {out:?}");
    }
    let (phase, served) =
        session::run_pod(&sb, "client", images::DEBIAN, &["curl", "-s", "-m", "10", "http://hello"]).unwrap();
    let diagnose = || {
        let endpoints = sb.kubectl_ok(&["get", "endpoints", "hello", "-o", "json"]).unwrap_or_default();
        let agent = sb.kubectl_ok(&["logs", "deployment/hello"]).unwrap_or_default();
        format!("endpoints: {endpoints}\nagent log: {agent}")
    };
    assert_eq!(
        (phase.as_str(), served.trim()),
        ("Succeeded", "served-locally"),
        "a client pod calling hello\n{}",
        diagnose()
    );
    std::process::Command::new("kill").args(["-INT", &walk_pid.to_string()]).status().unwrap();
    restored(&sb, &original, Duration::from_secs(15));
    sb.rolled_out("default", "hello").unwrap();
    let (_, answer) =
        session::run_pod(&sb, "client2", images::DEBIAN, &["curl", "-s", "-m", "10", "http://hello"]).unwrap();
    assert!(answer.starts_with("hello from hello-"), "the echo answers again: {answer:?}");

    drop(taken);
    drop(cleanup);
}

fn refused_while_swapped(sb: &Sandbox, holder: &str) {
    let out = tpd_output(sb, &["run", "--image", images::BUSYBOX, "--swap", "deployment/hello"]).unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "a second swap must be refused: {err}");
    assert!(err.contains(&format!("deployment/hello is swapped by {holder} since")), "{err}");
    // Refusing did not touch the live swap.
    assert!(swap_record(&session::deployment_json(sb, NS, "hello").unwrap()).is_some());
}

fn docker_ok(args: &[&str]) -> bool {
    std::process::Command::new("docker").args(args).output().is_ok_and(|o| o.status.success())
}

fn docker_out(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
