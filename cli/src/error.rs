//! User-facing errors: what happened, why, and the one thing to do next.

use std::process::ExitCode;

/// An error a user can act on: the message and the command or setting that
/// fixes it. Attach it as the outermost context of an `anyhow::Error`, or
/// return it directly; `report` prints its help line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Hint {
    pub message: String,
    pub help: String,
}

impl Hint {
    pub fn new(message: impl Into<String>, help: impl Into<String>) -> Self {
        Hint { message: message.into(), help: help.into() }
    }
}

/// Prints an error the way a user wants to read it: one line of what
/// happened (the chain of causes, each said once) and one `help:` line of
/// what to do. The debug form (and a backtrace, if enabled) only with `-v`.
pub fn report(err: &anyhow::Error, verbose: u8) -> ExitCode {
    eprintln!("error: {}", one_line(err));
    let hint = err.chain().find_map(|e| e.downcast_ref::<Hint>());
    match (hint, crate::logging::file()) {
        (Some(hint), _) => eprintln!("help: {}", hint.help),
        // An error we did not foresee: the log has the story.
        (None, Some(log)) => eprintln!("help: the log of this session is in {}", log.display()),
        (None, None) => eprintln!("help: run the command again with --verbose to see what led to this"),
    }
    if verbose > 0 {
        eprintln!("\n{err:?}");
    }
    ExitCode::FAILURE
}

/// The error and its causes joined by ": ", leaving out a cause whose text
/// the message before it already contains (`format!("…: {e}")` upstream).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain().map(ToString::to_string) {
        if line.contains(cause.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let said = format!("cannot read /x: {io}");
        let err = anyhow::Error::new(io).context(said.clone()).context("loading the config");
        assert_eq!(one_line(&err), format!("loading the config: {said}"));
    }
}
