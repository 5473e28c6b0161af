//! The client and server of the TCP figures (`tunnel`, `wan`): one Python
//! program, `probe.py`, run on every path so that every path is measured
//! with the same tool (its header lists its modes), and the reading of
//! what it prints.

use anyhow::{Context, Result, bail};
use tpd_e2e::dataplane::{Lab, docker};

pub const PROBE: &str = include_str!("probe.py");

/// A fresh data-plane lab with the probe serving on `port` on its cluster
/// network; the lab and the server's address.
pub fn lab_with_server(port: u16) -> Result<(Lab, String)> {
    let mut lab = Lab::start()?;
    let server = lab.run_on_cluster(
        "bench-server",
        tpd_e2e::images::DEBIAN,
        &["python3", "-c", PROBE, "serve", &port.to_string()],
    )?;
    let ip = docker(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &server])?;
    Ok((lab, ip))
}

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
