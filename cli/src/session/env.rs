//! The developer container's environment: the remote env (minus tpd's own
//! variables), overridden by `--env-file` then `-e`, and the formats `tpd
//! env` writes it in. Values may be secrets: nothing here logs them.

use std::path::PathBuf;

use tpd_wire::names::agent_env;

use crate::cli::EnvFormat;
use crate::error::Hint;

pub use crate::remote_env::Env;

/// Remote env, then each `--env-file`, then each `-e` (later wins). `-e KEY`
/// without a value takes KEY from tpd's own environment, as `docker run` does.
pub fn merge(remote: Env, flags: &[String], files: &[PathBuf]) -> anyhow::Result<Env> {
    let mut env: Env = remote.into_iter().filter(|(k, _)| !agent_env::ALL.contains(&k.as_str())).collect();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Hint::new(format!("cannot read the env file {}: {e}", file.display()), "check the path given to --env-file")
        })?;
        env.extend(parse_env_file(&text).map_err(|line| {
            Hint::new(format!("line {line} of {} is not KEY=VALUE", file.display()), "fix that line or remove it")
        })?);
    }
    for flag in flags {
        match flag.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                env.insert(k.to_owned(), v.to_owned());
            }
            Some(_) => {
                return Err(Hint::new(format!("-e {flag:?} has no name"), "write -e KEY=VALUE").into());
            }
            None => {
                if let Ok(v) = std::env::var(flag) {
                    env.insert(flag.clone(), v);
                }
            }
        }
    }
    Ok(env)
}

/// Docker's env-file syntax: KEY=VALUE lines, `#` comments, blank lines.
/// Returns the 1-based number of the first bad line.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, usize> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => out.push((k.trim().to_owned(), v.to_owned())),
            _ => return Err(i + 1),
        }
    }
    Ok(out)
}

/// Renders `env` for `tpd env --format`.
pub fn render(env: &Env, format: EnvFormat) -> Result<String, Hint> {
    Ok(match format {
        EnvFormat::Json => serde_json::to_string_pretty(env).unwrap_or_default() + "\n",
        EnvFormat::Dotenv => env.iter().map(|(k, v)| format!("{k}={}\n", double_quoted(v, "$"))).collect(),
        EnvFormat::Compose => {
            let mut out = String::from("environment:\n");
            for (k, v) in env {
                out.push_str(&format!("  {}: {}\n", double_quoted(k, "$$"), double_quoted(v, "$$")));
            }
            out
        }
        EnvFormat::Docker => {
            // `docker run --env-file` takes each line literally: no quoting, no newlines.
            if let Some((k, _)) = env.iter().find(|(_, v)| v.contains('\n')) {
                return Err(Hint::new(
                    format!("{k} holds several lines, which Docker's env-file format cannot carry"),
                    "use --format dotenv or --format json",
                ));
            }
            env.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
        }
    })
}

/// A double-quoted string that dotenv loaders and YAML read back as `s`;
/// `$` is written as `dollar` (`$$` keeps compose from interpolating).
fn double_quoted(s: &str, dollar: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' => out.push_str(dollar),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn flags_beat_files_beat_remote_and_tpds_own_vars_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dev.env");
        std::fs::write(&file, "# local\nMODE=file\n\nEXTRA=1\n").unwrap();
        let remote = env(&[("MODE", "prod"), ("DB", "pg"), (agent_env::SESSION, "s1"), (agent_env::PORTS, "80")]);
        let got = merge(remote, &["MODE=flag".into(), "EMPTY=".into()], &[file]).unwrap();
        assert_eq!(got, env(&[("DB", "pg"), ("EMPTY", ""), ("EXTRA", "1"), ("MODE", "flag")]));
    }

    #[test]
    fn env_file_errors_name_the_line() {
        assert_eq!(parse_env_file("A=1\nnot a pair\n"), Err(2));
        assert_eq!(parse_env_file("=x"), Err(1));
        assert_eq!(parse_env_file("  A = b=c"), Ok(vec![("A".into(), " b=c".into())]));
    }

    #[test]
    fn formats() {
        let e = env(&[("A", "x y"), ("B", "say \"hi\" $HOME\nbye")]);
        assert_eq!(render(&e, EnvFormat::Dotenv).unwrap(), "A=\"x y\"\nB=\"say \\\"hi\\\" $HOME\\nbye\"\n");
        assert_eq!(serde_json::from_str::<Env>(&render(&e, EnvFormat::Json).unwrap()).unwrap(), e);
        assert_eq!(
            render(&e, EnvFormat::Compose).unwrap(),
            "environment:\n  \"A\": \"x y\"\n  \"B\": \"say \\\"hi\\\" $$HOME\\nbye\"\n"
        );
        assert!(render(&e, EnvFormat::Docker).unwrap_err().message.contains("B holds several lines"));
        assert_eq!(render(&env(&[("A", "x y")]), EnvFormat::Docker).unwrap(), "A=x y\n");
    }
}
