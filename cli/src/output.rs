//! How commands report results: human text or one JSON document.

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// One line of progress on a slow step, on stderr so stdout stays for results.
pub fn progress(message: &str) {
    eprintln!("tpd: {message}");
}
