//! `tpd quit`: ends named sessions. It signals the process that holds the
//! session and follows its events until it has cleaned up; a session whose
//! process died is repaired with the same `Cleanup` here.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;

use crate::cli::{GlobalArgs, QuitArgs};
use crate::error::Hint;
use crate::output::progress;
use crate::session::named::{self as record, Follow, Record, cluster_of, events_path, log_path, repair, resolve_name};
use crate::swap::plan::Target;

pub async fn run(global: &GlobalArgs, args: &QuitArgs) -> anyhow::Result<ExitCode> {
    let names = match (&args.name, args.all) {
        (_, true) => record::list(),
        (name, false) => vec![resolve_name(global, name.as_deref()).await?],
    };
    if names.is_empty() {
        progress("no tpd connect session is running on this machine");
        return Ok(ExitCode::SUCCESS);
    }
    let mut ok = true;
    for name in names {
        match quit_one(global, &name).await {
            Ok(()) => {}
            Err(e) if !args.all => return Err(e),
            Err(e) => {
                eprintln!("tpd: session {name:?}: {e:#}");
                ok = false;
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// How long `tpd quit` waits for a session to clean up (its steps have
/// their own deadlines; the rollback wait is the longest).
const QUIT_DEADLINE: Duration = Duration::from_secs(120);

async fn quit_one(global: &GlobalArgs, name: &str) -> anyhow::Result<()> {
    let Some(r) = record::read(name)? else {
        let running = record::list();
        let help = match running.is_empty() {
            true => "`tpd status` lists this machine's sessions".to_owned(),
            false => format!("running sessions: {}", running.join(", ")),
        };
        return Err(Hint::new(format!("no tpd session named {name:?} is running"), help).into());
    };
    if record::alive(r.pid) {
        let log = log_path(name);
        let mut follow = Follow::from_end(&events_path(name));
        progress(&format!("ending session {name:?} (process {})", r.pid));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid as i32), nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("cannot signal the session's process {}", r.pid))?;
        let started = Instant::now();
        while record::alive(r.pid) {
            if started.elapsed() > QUIT_DEADLINE {
                follow.echo();
                return Err(Hint::new(
                    format!("session {name:?} did not end within {} s", QUIT_DEADLINE.as_secs()),
                    format!(
                        "see {}; `kill -9 {}` and `tpd quit {name}` again clean up without it",
                        log.display(),
                        r.pid
                    ),
                )
                .into());
            }
            follow.echo();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        follow.echo();
    }
    if record::read(name)?.is_some() {
        progress(&format!("the process that held session {name:?} ({}) is gone; cleaning up what it left", r.pid));
        repair(global, &r).await?;
    }
    report_restored(global, &r).await;
    progress(&format!("session {name:?} ended"));
    Ok(())
}

/// Says, from the cluster's current state, what the session left swapped.
async fn report_restored(global: &GlobalArgs, r: &Record) {
    let Ok(cluster) = cluster_of(global, r).await else {
        return;
    };
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    for s in &r.swaps {
        let Ok(target) = s.deployment.parse::<Target>() else {
            continue;
        };
        match api.get_opt(&target.name).await {
            Ok(Some(d)) => match crate::swap::record::Record::read(&d) {
                Ok(Some(rec)) if rec.session == r.id => {
                    progress(&format!("{target} is STILL swapped by this session: `tpd restore {target}`"))
                }
                Ok(Some(rec)) => progress(&format!("{target} is restored (and now swapped by {})", rec.holder)),
                _ => progress(&format!("{target} is restored as it was")),
            },
            Ok(None) => progress(&format!("{target} no longer exists")),
            Err(e) => progress(&format!("cannot read {target}: {e}")),
        }
    }
}
