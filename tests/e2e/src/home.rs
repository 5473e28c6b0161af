//! A fresh home for every `tpd` a test runs: its own `HOME` and `XDG_*`
//! directories in a temporary directory, so nothing a test needs can come
//! from another test (or the developer's own `~/.cache/tpd`) having run
//! first, and a missing `create_dir_all` shows up as the failure a new user
//! would see.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// The variables a `Home` sets, and the folder each points at inside it.
const VARS: [(&str, &str); 6] = [
    ("HOME", ""),
    ("XDG_CACHE_HOME", ".cache"),
    ("XDG_CONFIG_HOME", ".config"),
    ("XDG_DATA_HOME", ".local/share"),
    ("XDG_STATE_HOME", ".local/state"),
    ("XDG_RUNTIME_DIR", "run"),
];

/// An empty home directory, removed on drop. Only the home folder itself
/// exists at first: tpd must create everything below it.
#[derive(Debug)]
pub struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Result<Self> {
        Ok(Home { dir: tempfile::Builder::new().prefix("tpd-home-").tempdir().context("creating a test home")? })
    }

    /// `(variable, path)` for every variable a `Home` sets.
    pub fn vars(&self) -> Vec<(&'static str, PathBuf)> {
        VARS.iter().map(|(var, sub)| (*var, self.dir.path().join(sub))).collect()
    }

    /// Points `cmd` at this home.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.envs(self.vars())
    }

    /// `$XDG_CACHE_HOME` of this home, where tpd keeps its logs and records.
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join(".cache")
    }

    /// The home folder itself.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
