//! Settings from the config file, overridden by `TPD_*` env vars, overridden
//! by flags (clap applies the last two; this module adds the file and the
//! built-in defaults).

use std::path::PathBuf;

use serde::Deserialize;

use crate::cli::GlobalArgs;

/// `~/.config/tpd/config.toml`, or `$TPD_CONFIG`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub sidecar_image: Option<String>,
    pub agent_image: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the config file {path} is not valid TOML for tpd")]
    Parse { path: PathBuf, source: toml::de::Error },
}

/// The image names a session uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    pub sidecar: String,
    pub agent: String,
}

impl Images {
    /// The images matching this build of tpd.
    pub fn defaults() -> Self {
        let tag = tpd_wire::VERSION;
        Images {
            sidecar: format!("{}:{tag}", tpd_wire::names::SIDECAR_IMAGE_REPO),
            agent: format!("{}:{tag}", tpd_wire::names::AGENT_IMAGE_REPO),
        }
    }

    /// Flags/env (already merged by clap) win over the file, which wins over defaults.
    pub fn resolve(args: &GlobalArgs, file: &FileConfig) -> Self {
        let defaults = Self::defaults();
        Images {
            sidecar: args.sidecar_image.clone().or_else(|| file.sidecar_image.clone()).unwrap_or(defaults.sidecar),
            agent: args.agent_image.clone().or_else(|| file.agent_image.clone()).unwrap_or(defaults.agent),
        }
    }
}

fn config_path() -> Option<PathBuf> {
    std::env::var_os("TPD_CONFIG").map(PathBuf::from).or_else(|| dirs::config_dir().map(|d| d.join("tpd/config.toml")))
}

/// Reads the config file; a missing file is an empty config.
pub fn load() -> Result<FileConfig, ConfigError> {
    let Some(path) = config_path() else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(flags: &[&str]) -> GlobalArgs {
        let mut argv = vec!["tpd"];
        argv.extend_from_slice(flags);
        argv.push("version");
        crate::cli::Cli::parse_from(argv).global
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file = FileConfig { sidecar_image: Some("reg/sidecar:1".into()), agent_image: Some("reg/agent:1".into()) };
        let images = Images::resolve(&args(&["--agent-image", "mine/agent:2"]), &file);
        assert_eq!(images.agent, "mine/agent:2");
        assert_eq!(images.sidecar, "reg/sidecar:1");
        assert_eq!(Images::resolve(&args(&[]), &FileConfig::default()), Images::defaults());
    }

    #[test]
    fn unknown_keys_in_the_file_are_rejected() {
        assert!(toml::from_str::<FileConfig>("agent_img = \"x\"").is_err());
        let file: FileConfig = toml::from_str("agent_image = \"reg/agent:3\"").unwrap();
        assert_eq!(file.agent_image.as_deref(), Some("reg/agent:3"));
    }
}
