//! What the HTTP figure groups share: running wrk with a Lua reporter that prints exact counts
//! (instead of wrk's rounded text), and a throw-away nginx on loopback as the peer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use xshell::{cmd, Shell};

use crate::process;

/// wrk reports through this: one line of key=value pairs. A group's script may define
/// `request` (e.g. rotating MACs) before it.
pub const REPORT_LUA: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("pxelab-wrk requests=%d bytes=%d duration_us=%d p50_us=%d p99_us=%d errors=%d\n",
    summary.requests, summary.bytes, summary.duration, latency:percentile(50.0),
    latency:percentile(99.0), e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

/// One wrk run's summary.
pub struct Wrk {
    pub requests: u64,
    pub bytes: u64,
    pub duration_us: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Connect, read, write, status and timeout errors together.
    pub errors: u64,
}

impl Wrk {
    pub fn secs(&self) -> f64 {
        self.duration_us.max(1) as f64 / 1e6
    }

    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.secs()
    }
}

/// `wrk` against `url` with `clients` connections (2 threads at most: the server needs the other
/// core) for `secs` seconds, reporting through `script` (which ends with [`REPORT_LUA`]); `env`
/// reaches the script through `os.getenv`.
pub fn run(
    sh: &Shell,
    script: &Path,
    url: &str,
    clients: u32,
    secs: u32,
    env: &[(&str, String)],
) -> Result<Wrk> {
    let (threads, connections, duration) = (
        clients.min(2).to_string(),
        clients.to_string(),
        format!("{secs}s"),
    );
    let mut wrk = cmd!(
        sh,
        "wrk -t {threads} -c {connections} -d {duration} --timeout 60s -s {script} {url}"
    );
    for (k, v) in env {
        wrk = wrk.env(k, v);
    }
    let out = process::read(wrk)?;
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("pxelab-wrk "))
        .with_context(|| format!("wrk printed no summary line:\n{out}"))?;
    let kv: BTreeMap<&str, u64> = line
        .split_whitespace()
        .filter_map(|w| {
            w.split_once('=')
                .and_then(|(k, v)| Some((k, v.parse().ok()?)))
        })
        .collect();
    let get = |k: &str| {
        kv.get(k)
            .copied()
            .with_context(|| format!("wrk summary has no {k}: {line}"))
    };
    let r = Wrk {
        requests: get("requests")?,
        bytes: get("bytes")?,
        duration_us: get("duration_us")?,
        p50_us: get("p50_us")?,
        p99_us: get("p99_us")?,
        errors: get("errors")?,
    };
    ensure!(
        r.requests > 0 && r.bytes > 0,
        "wrk got no answer from {url} in {secs} s"
    );
    Ok(r)
}

/// nginx's config for a throw-away server on `127.0.0.1:<port>` under `dir/nginx/`, with
/// `locations` (nginx `location` blocks) in its one server. Returns the config's path.
pub fn nginx_conf(dir: &Path, port: u16, locations: &str) -> Result<PathBuf> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix)?;
    let p = prefix.display();
    let conf = format!(
        "# Written by `cargo xtask bench`: a throw-away nginx on loopback, no system service.\n\
         daemon off;\n\
         worker_processes auto;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 sendfile on;\n\
         \x20 tcp_nopush on;\n\
         \x20 keepalive_requests 1000000;\n\
         \x20 client_body_temp_path {p}/client_body;\n\
         \x20 proxy_temp_path {p}/proxy;\n\
         \x20 fastcgi_temp_path {p}/fastcgi;\n\
         \x20 uwsgi_temp_path {p}/uwsgi;\n\
         \x20 scgi_temp_path {p}/scgi;\n\
         \x20 default_type application/octet-stream;\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         {locations}\
         \x20 }}\n\
         }}\n"
    );
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// nginx (a worker user) must be able to read what it serves from a private scratch dir.
pub fn chmod(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", p.display()))
}

/// The output of a `--version`-like command, whatever its exit status (`wrk --version` exits 1).
fn version_output(program: &str, flag: &str) -> Result<std::process::Output> {
    let sh = process::shell()?;
    Ok(cmd!(sh, "{program} {flag}")
        .quiet()
        .ignore_status()
        .output()?)
}

/// `nginx 1.22.1`, for the facts of a group.
pub fn nginx_version() -> String {
    let out = version_output("nginx", "-v");
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    text.trim()
        .rsplit('/')
        .next()
        .filter(|v| !v.is_empty())
        .map(|v| format!("nginx {v}"))
        .unwrap_or_else(|| "nginx".into())
}

/// wrk's version, for the facts of a group.
pub fn wrk_version() -> String {
    let out = version_output("wrk", "--version");
    let text = out
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default();
    text.split_whitespace()
        .nth(1)
        .unwrap_or("unknown")
        .to_string()
}
