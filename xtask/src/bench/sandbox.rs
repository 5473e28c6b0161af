//! Figures of the sandbox's API server: GET latency (p50, p99) of one
//! object and of a list, and watch-event latency (a write on one connection
//! until its event arrives on a watch). Plain HTTP/1.1 keep-alive over
//! loopback, so the figures are the server's, not a client library's; the
//! baseline is `GET /healthz` on the same connection (the HTTP stack alone).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use tpd_e2e::sandbox::Sandbox;

use super::Figure;

const GETS: usize = 2000;
const LIST_ITEMS: usize = 50;
const LISTS: usize = 300;
const WATCH_EVENTS: usize = 200;

/// Measures the API server of a running sandbox instance.
pub fn figures(sb: &Sandbox) -> Result<Vec<Figure>> {
    std::fs::read_to_string(&sb.kubeconfig)
        .context("reading the kubeconfig")
        .and_then(|k| port_of(&k))
        .and_then(measure)
}

fn port_of(kubeconfig: &str) -> Result<u16> {
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: http://127.0.0.1:"))
        .context("no server line")?;
    server.trim().parse().context("server port")
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Result<Self> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { reader: BufReader::new(s) })
    }

    /// Sends a request and reads a Content-Length response; returns the status.
    fn call(&mut self, method: &str, path: &str, body: &str) -> Result<u16> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.reader.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse()?;
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body)?;
        Ok(status)
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i].as_secs_f64() * 1000.0
}

fn time_calls(conn: &mut Conn, n: usize, path: &str) -> Result<Vec<Duration>> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            let status = conn.call("GET", path, "")?;
            if status != 200 {
                bail!("GET {path}: {status}");
            }
            Ok(start.elapsed())
        })
        .collect()
}

fn configmap(name: &str) -> String {
    format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}","labels":{{"bench":"watch"}}}},"data":{{"k":"v"}}}}"#
    )
}

fn measure(port: u16) -> Result<Vec<Figure>> {
    let mut conn = Conn::open(port)?;
    let cms = "/api/v1/namespaces/default/configmaps";
    for i in 0..LIST_ITEMS {
        conn.call("POST", cms, &configmap(&format!("bench-{i}")))?;
    }
    let mut health = time_calls(&mut conn, GETS, "/healthz")?;
    let mut get = time_calls(&mut conn, GETS, &format!("{cms}/bench-0"))?;
    let mut list = time_calls(&mut conn, LISTS, cms)?;
    let health_p50 = percentile(&mut health, 0.5);
    let mut figures = vec![
        Figure::new("api GET configmap p50", percentile(&mut get, 0.5), "ms").against("GET /healthz p50", health_p50),
        Figure::new("api GET configmap p99", percentile(&mut get, 0.99), "ms"),
        Figure::new(format!("api LIST {LIST_ITEMS} configmaps p50"), percentile(&mut list, 0.5), "ms")
            .against("GET /healthz p50", health_p50),
    ];
    figures.push(watch_latency(port, &mut conn)?);
    Ok(figures)
}

/// Creates configmaps one by one and times each until its ADDED event is read
/// from a watch opened beforehand.
fn watch_latency(port: u16, writer: &mut Conn) -> Result<Figure> {
    let mut watch = TcpStream::connect(("127.0.0.1", port))?;
    watch.set_read_timeout(Some(Duration::from_secs(10)))?;
    // No resourceVersion: the watch starts with the existing objects as ADDED.
    let path = "/api/v1/namespaces/default/configmaps?watch=1&labelSelector=bench%3Dwatch";
    watch.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Drain the initial ADDED events of the existing objects.
    let settle = Instant::now();
    watch.set_read_timeout(Some(Duration::from_millis(300)))?;
    while settle.elapsed() < Duration::from_secs(2) {
        match watch.read(&mut buf) {
            Ok(0) => bail!("watch closed"),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    watch.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut samples = Vec::with_capacity(WATCH_EVENTS);
    for i in 0..WATCH_EVENTS {
        let name = format!("watched-{i}");
        let start = Instant::now();
        writer.call("POST", "/api/v1/namespaces/default/configmaps", &configmap(&name))?;
        let needle = format!("\"name\":\"{name}\"");
        loop {
            let n = watch.read(&mut buf)?;
            if n == 0 {
                bail!("watch closed");
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                break;
            }
        }
        samples.push(start.elapsed());
        seen.clear();
    }
    Ok(Figure::new("api watch event after create p50", percentile(&mut samples, 0.5), "ms"))
}
