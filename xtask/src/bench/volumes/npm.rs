//! The `npm ls`-style walk: a generated `node_modules` tree and, for each
//! package, what Node's resolver does to `require` it from the previous
//! package's `lib/`: look for a `node_modules` beside the requiring file and
//! one up (missing), find the package's directory, read its package.json,
//! try its `main` without an extension and as a directory index (missing)
//! before `main.js`. Most paths it stats do not exist, as in a real
//! resolution, where a negative answer costs a round trip unless kept.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

/// The application's directory in the benchmark tree.
pub const APP: &str = "app";
/// Packages in its `node_modules`.
pub const PACKAGES: usize = 100;

fn name(i: usize) -> String {
    format!("pkg-{i:03}")
}

/// `node_modules/pkg-NNN/{package.json, index.js, lib/main.js, README.md}`.
pub fn make(app: &Path) -> Result<()> {
    for i in 0..PACKAGES {
        let dir = app.join("node_modules").join(name(i));
        std::fs::create_dir_all(dir.join("lib"))?;
        let manifest = format!(r#"{{"name":"{}","version":"1.0.{i}","main":"lib/main"}}"#, name(i));
        std::fs::write(dir.join("package.json"), manifest)?;
        std::fs::write(dir.join("index.js"), "module.exports = require('./lib/main');\n")?;
        std::fs::write(dir.join("lib/main.js"), format!("module.exports = {i};\n"))?;
        std::fs::write(dir.join("README.md"), "# a package\n")?;
    }
    Ok(())
}

/// Resolves every package in turn, each from the one before.
pub fn walk(root: &Path) -> Result<Duration> {
    let modules = root.join(APP).join("node_modules");
    super::timed(|| {
        for i in 0..PACKAGES {
            let (from, to) = (modules.join(name(i.saturating_sub(1))), modules.join(name(i)));
            for missing in [
                from.join("lib/node_modules").join(name(i)),
                from.join("node_modules").join(name(i)),
                to.join("lib/main"),
                to.join("lib/main/index.js"),
                to.join("index.json"),
            ] {
                ensure!(std::fs::metadata(&missing).is_err(), "{} exists", missing.display());
            }
            ensure!(std::fs::metadata(&to)?.is_dir(), "{} is no directory", to.display());
            let manifest = std::fs::read(to.join("package.json")).context("reading package.json")?;
            ensure!(manifest.starts_with(b"{"), "package.json of {} is not JSON", name(i));
            std::fs::metadata(to.join("lib/main.js"))?;
        }
        Ok(())
    })
}
