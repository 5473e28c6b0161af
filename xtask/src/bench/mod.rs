//! Benchmark harness: every benchmark returns [`Figure`]s, which are printed
//! as a table or, with `--json`, one JSON object per line. Figures are
//! compared with a baseline measured in the same run on the same machine;
//! nothing here ever fails a build because a number is slow.

use std::path::Path;

use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
// Fails once a stop was asked for. The benchmarks call it between steps;
// the error unwinds through their labs' cleanup.
pub use tpd_e2e::interrupt::go_on;

mod cpu;
mod intercept;
mod probe;
mod sandbox;
mod sandbox_node;
mod session;
mod soak;
mod tunnel;
mod volumes;
pub mod wan;

/// One measured figure and, where there is one, the baseline it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// What the baseline is (e.g. "boringtun-cli between netns").
    pub baseline: Option<String>,
    pub baseline_value: Option<f64>,
    /// value / baseline_value.
    pub ratio: Option<f64>,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Figure { name: name.into(), value, unit: unit.into(), baseline: None, baseline_value: None, ratio: None }
    }

    /// Attaches the baseline this figure is compared with.
    pub fn against(mut self, baseline: impl Into<String>, baseline_value: f64) -> Self {
        self.ratio = (baseline_value != 0.0).then(|| self.value / baseline_value);
        self.baseline = Some(baseline.into());
        self.baseline_value = Some(baseline_value);
        self
    }
}

/// Prints figures as an aligned table, or one JSON object per line.
pub fn print(figures: &[Figure], json: bool) {
    if json {
        for f in figures {
            println!("{}", serde_json::to_string(f).unwrap_or_default());
        }
        return;
    }
    let width = figures.iter().map(|f| f.name.chars().count()).max().unwrap_or(0).max(44);
    println!("{:<width$} {:>12} {:<8} {:>12}  {:<8} baseline", "figure", "value", "unit", "baseline", "ratio");
    for f in figures {
        let base = f.baseline_value.map(|v| format!("{v:.2}")).unwrap_or_default();
        let ratio = f.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
        let what = f.baseline.as_deref().unwrap_or("");
        println!("{:<width$} {:>12.2} {:<8} {:>12}  {:<8} {}", f.name, f.value, f.unit, base, ratio, what);
    }
}

/// The benchmark suites `cargo xtask bench` knows.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    Tunnel,
    Volumes,
    Session,
    Intercept,
    Sandbox,
    Soak,
    /// Plain TCP and tpd over an emulated WAN link (`--rtt`, `--loss`, `--rate`).
    Wan,
}

pub fn run(which: Which, json: bool, minutes: u64, wan: &wan::Flags, root: &Path) -> anyhow::Result<()> {
    let session_rtt_only = matches!(which, Which::Session) && !wan.only_for_the_link();
    if wan.given() && !matches!(which, Which::Wan) && !session_rtt_only {
        anyhow::bail!(
            "--rtt, --loss, --rate and --volumes belong to `cargo xtask bench wan` (--rtt also to `bench session`: the API server's), not to this suite"
        );
    }
    stop_on_signals()?;
    let figures = measure(which, minutes, wan, root).map_err(|e| {
        if go_on().is_err() { anyhow::anyhow!("interrupted; what this run had started is removed") } else { e }
    })?;
    print(&figures, json);
    Ok(())
}

/// Makes the first Ctrl-C (SIGINT) or SIGTERM stop the run at its next step
/// instead of killing it: only an orderly return runs the code that removes
/// a run's containers, networks, FUSE mounts and network namespaces. Ctrl-C
/// also ends the step's own child processes (they share the terminal's
/// process group), so the step fails at once. A second signal quits now.
fn stop_on_signals() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut interrupt, mut terminate) = {
        let _entered = runtime.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    std::thread::spawn(move || {
        runtime.block_on(async {
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                if tpd_e2e::interrupt::request() {
                    std::process::exit(130);
                }
                eprintln!("stopping: removing what this run started (signal again to quit at once and leave it)…");
            }
        });
    });
    Ok(())
}

fn measure(which: Which, minutes: u64, wan: &wan::Flags, root: &Path) -> anyhow::Result<Vec<Figure>> {
    Ok(match which {
        Which::Tunnel => tunnel::run()?,
        Which::Volumes => volumes::run()?,
        Which::Session => session::run(wan.rtt())?,
        Which::Intercept => intercept::run()?,
        Which::Soak => soak::run(minutes)?,
        Which::Wan => wan::run(wan)?,
        Which::Sandbox => {
            // A release build: the figures are the server's, not debug code's.
            crate::run(crate::cargo(root).args(["build", "--quiet", "--release", "-p", "tpd-sandbox"]))?;
            let sb = tpd_e2e::sandbox::Sandbox::up_with(crate::target_dir(root)?.join("release/tpd-sandbox"))?;
            let mut figures = sandbox::figures(&sb)?;
            figures.extend(sandbox_node::figures(&sb)?);
            figures
        }
    })
}
