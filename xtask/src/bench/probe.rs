//! The client and server of the TCP figures (`tunnel`, `wan`): one Python
//! program, `probe.py`, run on every path so that every path is measured
//! with the same tool (its header lists its modes), and the reading of
//! what it prints.

use anyhow::{Context, Result, bail};

pub const PROBE: &str = include_str!("probe.py");

/// Every number the probe printed.
pub fn numbers(out: &str) -> Result<Vec<f64>> {
    out.split_whitespace().map(|v| v.parse::<f64>().with_context(|| format!("probe printed {out:?}"))).collect()
}

/// The one figure a probe prints.
pub fn figure(out: &str) -> Result<f64> {
    match numbers(out)?[..] {
        [value] => Ok(value),
        _ => bail!("probe printed {out:?}, not one figure"),
    }
}

/// The `p` quantile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}
