//! Benchmark harness: every benchmark returns [`Figure`]s, which are printed
//! as a table or, with `--json`, one JSON object per line. Figures are
//! compared with a baseline measured in the same run on the same machine;
//! nothing here ever fails a build because a number is slow.

use std::path::Path;

use serde::Serialize;

mod sandbox;
mod sandbox_node;
mod session;
mod tunnel;
mod volumes;

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
    println!("{:<44} {:>12} {:<8} {:>12}  {:<8} baseline", "figure", "value", "unit", "baseline", "ratio");
    for f in figures {
        let base = f.baseline_value.map(|v| format!("{v:.2}")).unwrap_or_default();
        let ratio = f.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
        let what = f.baseline.as_deref().unwrap_or("");
        println!("{:<44} {:>12.2} {:<8} {:>12}  {:<8} {}", f.name, f.value, f.unit, base, ratio, what);
    }
}

/// The benchmark suites `cargo xtask bench` knows.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Which {
    Tunnel,
    Volumes,
    Session,
    Sandbox,
}

pub fn run(which: Which, json: bool, root: &Path) -> anyhow::Result<()> {
    let figures = match which {
        Which::Tunnel => tunnel::run()?,
        Which::Volumes => volumes::run()?,
        Which::Session => session::run(json)?,
        Which::Sandbox => {
            // A release build: the figures are the server's, not debug code's.
            crate::run(crate::cargo(root).args(["build", "--quiet", "--release", "-p", "tpd-sandbox"]))?;
            let sb = tpd_e2e::sandbox::Sandbox::up_with(crate::target_dir(root)?.join("release/tpd-sandbox"))?;
            let mut figures = sandbox::figures(&sb)?;
            figures.extend(sandbox_node::figures(&sb)?);
            figures
        }
    };
    print(&figures, json);
    Ok(())
}
