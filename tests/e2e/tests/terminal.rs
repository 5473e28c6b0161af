//! `tpd run -it` in a real terminal (a tmux pane): the user types into a
//! shell in the local container, `exit 3` ends the session without another
//! keypress, tpd exits with the shell's code, and tpd's last lines start at
//! the left margin (the terminal is out of raw mode before they are printed);
//! under `--swap` and under `--intercept`.

// A failed unwrap is a failed test, with its message and line.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tpd_e2e::images;
use tpd_e2e::sandbox::Sandbox;
use tpd_e2e::session::{self, swap_record, wait_deployment};

/// A tmux server of the test's own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        Tmux { socket: format!("tpd-e2e-{}", std::process::id()) }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux").args(["-L", &self.socket]).args(args).output().expect("tmux runs")
    }

    /// What the pane shows now, one string per line.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "tpd"]).stdout).into_owned()
    }

    /// Waits until the pane shows `text`; fails with the screen after `timeout`.
    fn wait_for(&self, text: &str, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(started.elapsed() < timeout, "{text:?} did not appear within {timeout:?}; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn type_line(&self, line: &str) {
        self.cmd(&["send-keys", "-t", "tpd", "-l", line]);
        self.cmd(&["send-keys", "-t", "tpd", "Enter"]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// Quotes a word for the shell tmux starts.
fn quoted(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Starts `tpd run -it --image DEBIAN ARGS -- bash` in a tmux pane with
/// the environment `session::tpd` gives a command, then `echo
/// tpd-exit=$?`; waits for the shell's prompt.
fn interactive_tpd(sb: &Sandbox, args: &str) -> Tmux {
    let mut env: Vec<String> =
        sb.home.vars().iter().map(|(k, v)| format!("{k}={}", quoted(&v.to_string_lossy()))).collect();
    env.push(format!("KUBECONFIG={}", quoted(&sb.kubeconfig.to_string_lossy())));
    let tpd = session::binary().unwrap();
    let line = format!(
        "env -u TPD_CONFIG {} {} run -it --image {} {args} -- bash; echo tpd-exit=$?; sleep 600",
        env.join(" "),
        quoted(&tpd.to_string_lossy()),
        images::DEBIAN,
    );
    let tmux = Tmux::new();
    let started = tmux.cmd(&["new-session", "-d", "-s", "tpd", "-x", "160", "-y", "50", &line]);
    assert!(started.status.success(), "tmux: {}", String::from_utf8_lossy(&started.stderr));
    tmux.wait_for("root@", Duration::from_secs(120));
    tmux
}

/// Types a line into the shell and sees its answer, then `exit 3`: tpd
/// ends with the shell's code, its lines at the left margin.
fn type_then_exit(tmux: &Tmux) {
    tmux.type_line("echo typed-$((6*7))");
    tmux.wait_for("typed-42", Duration::from_secs(10));
    // `exit 3`, and no other key: tpd ends the session and exits.
    tmux.type_line("exit 3");
    let screen = tmux.wait_for("tpd-exit=", Duration::from_secs(90));
    assert!(screen.contains("tpd-exit=3"), "tpd exits with the shell's code; the screen:\n{screen}");
    let after_exit = screen.rsplit("exit 3").next().unwrap();
    for l in after_exit.lines().filter(|l| l.contains("tpd: ")) {
        assert!(l.starts_with("tpd: "), "a line of tpd's starts mid-line ({l:?}); the screen:\n{screen}");
    }
}

#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn an_interactive_shell_ends_the_session_when_it_exits() {
    session::prerequisites().unwrap();
    let sb = Sandbox::up().unwrap();
    session::deploy_echo(&sb, "hello").unwrap();
    let tmux = interactive_tpd(&sb, "--swap deployment/hello");
    let (d, _) =
        wait_deployment(&sb, "default", "hello", Duration::from_secs(10), |d| swap_record(d).is_some()).unwrap();
    let session_id = swap_record(&d).unwrap()["session"].as_str().unwrap().to_owned();
    let _cleanup = session::Cleanup { children: vec![], sessions: vec![session_id] };
    type_then_exit(&tmux);
    wait_deployment(&sb, "default", "hello", Duration::from_secs(30), |d| swap_record(d).is_none()).unwrap();
}

/// The same under `--intercept`: the shell is the developer's container
/// of an intercept, and its exit ends the intercept, which, as the only
/// one, puts the Deployment back as it was.
#[test]
#[ignore = "needs Docker; `cargo xtask test` runs it"]
fn an_interactive_shell_under_an_intercept_ends_it_when_it_exits() {
    session::prerequisites().unwrap();
    let sb = Sandbox::up().unwrap();
    session::deploy_echo(&sb, "tty").unwrap();
    let original = session::user_owned(session::deployment_json(&sb, "default", "tty").unwrap());
    let tmux = interactive_tpd(&sb, "--intercept deployment/tty --port 8080:8080 --header x-dev=tty");
    let d = session::deployment_json(&sb, "default", "tty").unwrap();
    let entry = d["metadata"]["annotations"].as_object().unwrap().keys().find(|k| k.starts_with("tpd.dev/intercept."));
    let session_id = entry.expect("the session's intercept entry").trim_start_matches("tpd.dev/intercept.").to_owned();
    let _cleanup = session::Cleanup { children: vec![], sessions: vec![session_id] };
    type_then_exit(&tmux);
    let intercepted = |d: &serde_json::Value| d["metadata"]["annotations"].get("tpd.dev/intercept").is_some();
    let (d, _) = wait_deployment(&sb, "default", "tty", Duration::from_secs(30), |d| !intercepted(d)).unwrap();
    assert_eq!(session::user_owned(d), original, "the Deployment is as it was");
}
