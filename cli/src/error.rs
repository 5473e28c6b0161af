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

/// Prints an error chain the way a user wants to read it, and picks the exit
/// code. Backtraces and debug detail only with `-v`.
pub fn report(err: &anyhow::Error, verbose: u8) -> ExitCode {
    eprintln!("error: {err}");
    for cause in err.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if let Some(hint) = err.chain().find_map(|e| e.downcast_ref::<Hint>()) {
        eprintln!("  help: {}", hint.help);
    }
    if verbose > 0 {
        eprintln!("\n{err:?}");
    }
    // An error without a hint is one we did not foresee: the log has the story.
    if let (None, Some(log)) = (err.chain().find_map(|e| e.downcast_ref::<Hint>()), crate::logging::file()) {
        eprintln!("  the log of this session is in {}", log.display());
    }
    ExitCode::FAILURE
}
