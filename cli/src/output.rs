//! How commands report results (human text or one JSON document) and the
//! progress and warnings of slow steps, which go to the terminal or, in
//! `tpd connect`'s background process, as typed [`Note`]s to the events
//! file that `tpd connect` and `tpd quit` follow.

use std::fs::File;
use std::io::Write as _;
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// A line of progress or a warning, as a process that follows another's
/// events file reads it (one JSON object per line, tagged by `event`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Note {
    Progress { message: String },
    Warning { message: String },
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::Progress { message } => write!(f, "tpd: {message}"),
            Note::Warning { message } => write!(f, "warning: {message}"),
        }
    }
}

/// Where this process's notes go instead of stderr, once [`notes_to`] set it.
static EVENTS: OnceLock<Mutex<File>> = OnceLock::new();

/// From now on, notes and [`event`]s are JSON lines appended to `file`.
pub fn notes_to(file: File) {
    let _ = EVENTS.set(Mutex::new(file));
}

/// One line of progress on a slow step, on stderr so stdout stays for results.
pub fn progress(message: &str) {
    note(&Note::Progress { message: message.to_owned() });
}

/// Something the user should know that does not stop the command.
pub fn warning(message: &str) {
    note(&Note::Warning { message: message.to_owned() });
}

fn note(n: &Note) {
    if !event(n) {
        eprintln!("{n}");
    }
}

/// Appends `line` to the events file as one JSON line; false when this
/// process has none (it talks to a terminal).
pub fn event(line: &impl Serialize) -> bool {
    let Some(file) = EVENTS.get() else {
        return false;
    };
    let mut json = serde_json::to_vec(line).unwrap_or_default();
    json.push(b'\n');
    // One write per line, so a follower never sees half of one.
    let _ = file.lock().unwrap_or_else(|p| p.into_inner()).write_all(&json);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_read_back_as_written_and_print_as_before() {
        let n = Note::Warning { message: "port 6379 is taken".into() };
        let line = serde_json::to_string(&n).unwrap();
        assert_eq!(line, r#"{"event":"warning","message":"port 6379 is taken"}"#);
        assert_eq!(serde_json::from_str::<Note>(&line).unwrap(), n);
        assert_eq!(Note::Progress { message: "ready".into() }.to_string(), "tpd: ready");
    }
}
