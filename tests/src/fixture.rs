//! A loopback HTTP/1.1 server for tests: serves in-memory files and injects the faults a real
//! mirror shows (cut connections, ignored `Range`, wrong bytes, error statuses, slow links).
//!
//! One thread per connection, `Connection: close` on every reply: simple beats fast here, and
//! clients must cope with closed connections anyway. Every request is recorded, so tests can
//! assert what a client actually asked for (e.g. "exactly one download", "resumed with Range").

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the server answers GET/HEAD for one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// 200, or 206 + `Content-Range` for `Range: bytes=N-` / `N-M`.
    Normal,
    /// The first GET sends the headers (full `Content-Length` of the reply) and then only N body
    /// bytes before closing; later GETs behave like `Normal`.
    CutOnceAfter(u64),
    /// Every GET is cut after N body bytes (Range still honoured, so a resuming client progresses).
    CutEveryAfter(u64),
    /// Always 200 with the full body, whatever `Range` says.
    IgnoreRange,
    /// Same length, wrong bytes.
    Corrupt,
    /// Reply with this status and a short text body.
    Status(u16),
    /// Like `Normal` but throttled.
    Slow { bytes_per_sec: u64 },
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Request target including any query string.
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Entry {
    body: Arc<Vec<u8>>,
    behavior: Behavior,
    gets: u64,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Entry>,
    requests: Vec<Recorded>,
}

/// A running fixture server on `127.0.0.1:<random port>`; dropping it stops it.
pub struct FixtureServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FixtureServer {
    pub fn start() -> FixtureServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local_addr of the fixture listener");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = Arc::clone(&state);
                    let stop = Arc::clone(&stop);
                    std::thread::spawn(move || {
                        // A client that hangs up mid-reply is normal in these tests.
                        let _ = handle(conn, &state, &stop);
                    });
                }
            })
        };
        FixtureServer {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `url("/a/b")` and `url("a/b")` both give `http://127.0.0.1:PORT/a/b`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base_url(), path.trim_start_matches('/'))
    }

    /// Serve `body` at `path` (inserts or replaces; resets the path's GET count for `CutOnceAfter`).
    pub fn serve(&self, path: &str, body: impl Into<Vec<u8>>, behavior: Behavior) {
        let entry = Entry {
            body: Arc::new(body.into()),
            behavior,
            gets: 0,
        };
        self.lock().files.insert(normalize(path), entry);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// How many GET/HEAD requests asked for `path` (query ignored).
    pub fn hits(&self, path: &str) -> usize {
        let path = normalize(path);
        self.lock()
            .requests
            .iter()
            .filter(|r| (r.method == "GET" || r.method == "HEAD") && strip_query(&r.path) == path)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FixtureServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn normalize(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/'))
}

fn strip_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

fn handle(conn: TcpStream, state: &Mutex<State>, stop: &AtomicBool) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let recorded = Recorded {
        method: method.clone(),
        path: path.clone(),
        headers,
        body,
    };
    let range = recorded.header("range").map(str::to_string);

    // Decide the reply while holding the lock, send it after releasing it.
    let reply = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests.push(recorded);
        match method.as_str() {
            "GET" | "HEAD" => match st.files.get_mut(strip_query(&path)) {
                Some(entry) => {
                    let first_get = entry.gets == 0;
                    if method == "GET" {
                        entry.gets += 1;
                    }
                    Reply::File {
                        body: Arc::clone(&entry.body),
                        behavior: entry.behavior.clone(),
                        first_get,
                    }
                }
                None => Reply::Simple(404, b"not found\n".to_vec()),
            },
            "POST" | "PUT" => Reply::Simple(204, Vec::new()),
            _ => Reply::Simple(405, b"method not allowed\n".to_vec()),
        }
    };
    let mut out = conn;
    match reply {
        Reply::Simple(status, body) => {
            let head = head_lines(status, body.len() as u64, &[]);
            out.write_all(head.as_bytes())?;
            if method != "HEAD" {
                out.write_all(&body)?;
            }
        }
        Reply::File {
            body,
            behavior,
            first_get,
        } => send_file(
            &mut out,
            &method,
            range.as_deref(),
            &body,
            &behavior,
            first_get,
            stop,
        )?,
    }
    out.flush()?;
    let _ = out.shutdown(std::net::Shutdown::Both);
    Ok(())
}

enum Reply {
    Simple(u16, Vec<u8>),
    File {
        body: Arc<Vec<u8>>,
        behavior: Behavior,
        first_get: bool,
    },
}

fn send_file(
    out: &mut TcpStream,
    method: &str,
    range: Option<&str>,
    body: &[u8],
    behavior: &Behavior,
    first_get: bool,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    if let Behavior::Status(code) = behavior {
        let text = format!("status {code}\n");
        out.write_all(head_lines(*code, text.len() as u64, &[]).as_bytes())?;
        if method != "HEAD" {
            out.write_all(text.as_bytes())?;
        }
        return Ok(());
    }
    let total = body.len() as u64;
    let honour_range = *behavior != Behavior::IgnoreRange;
    let (status, start, end, extra) = match range
        .filter(|_| honour_range)
        .map(|r| parse_range(r, total))
    {
        Some(Some((s, e))) => (
            206,
            s,
            e,
            vec![format!("Content-Range: bytes {s}-{}/{total}", e - 1)],
        ),
        Some(None) => {
            let h = head_lines(416, 0, &[format!("Content-Range: bytes */{total}")]);
            return out.write_all(h.as_bytes());
        }
        None => (200, 0, total, Vec::new()),
    };
    out.write_all(head_lines(status, end - start, &extra).as_bytes())?;
    if method == "HEAD" {
        return Ok(());
    }
    let mut payload = body[start as usize..end as usize].to_vec();
    if *behavior == Behavior::Corrupt {
        // Flip one byte in every 4 KiB (and always the first): same length, wrong hash.
        for (i, b) in payload.iter_mut().enumerate() {
            if i % 4096 == 0 {
                *b ^= 0xff;
            }
        }
    }
    let cut = match behavior {
        Behavior::CutOnceAfter(n) if first_get => Some(*n),
        Behavior::CutEveryAfter(n) => Some(*n),
        _ => None,
    };
    if let Some(n) = cut {
        payload.truncate(n.min(payload.len() as u64) as usize);
    }
    match behavior {
        Behavior::Slow { bytes_per_sec } => {
            // Ten slices a second keeps progress smooth without busy-looping.
            let slice = (*bytes_per_sec / 10).max(1) as usize;
            for chunk in payload.chunks(slice) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                out.write_all(chunk)?;
                out.flush()?;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        _ => out.write_all(&payload)?,
    }
    Ok(())
}

/// `bytes=N-` or `bytes=N-M` → half-open `[start, end)`; `None` when unsatisfiable or malformed.
fn parse_range(value: &str, total: u64) -> Option<(u64, u64)> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = if b.trim().is_empty() {
        total
    } else {
        b.trim().parse::<u64>().ok()?.saturating_add(1).min(total)
    };
    (start < total && start < end).then_some((start, end))
}

fn head_lines(status: u16, content_length: u64, extra: &[String]) -> String {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut h = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    if status != 204 {
        h.push_str(&format!("Content-Length: {content_length}\r\n"));
    }
    if status == 200 || status == 206 {
        h.push_str("Accept-Ranges: bytes\r\n");
    }
    for e in extra {
        h.push_str(e);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw HTTP/1.1 exchange, so the server is tested without any client library's help.
    fn raw(server: &FixtureServer, request: &str) -> (String, Vec<u8>) {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (
            String::from_utf8(all[..split].to_vec()).unwrap(),
            all[split + 4..].to_vec(),
        )
    }

    fn get(server: &FixtureServer, path: &str, extra: &str) -> (String, Vec<u8>) {
        raw(
            server,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n"),
        )
    }

    #[test]
    fn serves_ranges_and_404() {
        let s = FixtureServer::start();
        s.serve("/f", b"0123456789".to_vec(), Behavior::Normal);
        let (h, b) = get(&s, "/f", "");
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(b, b"0123456789");
        let (h, b) = get(&s, "/f", "Range: bytes=4-\r\n");
        assert!(
            h.starts_with("HTTP/1.1 206") && h.contains("Content-Range: bytes 4-9/10"),
            "{h}"
        );
        assert_eq!(b, b"456789");
        let (_, b) = get(&s, "/f?x=1", "Range: bytes=2-3\r\n");
        assert_eq!(b, b"23");
        let (h, _) = get(&s, "/f", "Range: bytes=10-\r\n");
        assert!(h.starts_with("HTTP/1.1 416"), "{h}");
        let (h, _) = get(&s, "/missing", "");
        assert!(h.starts_with("HTTP/1.1 404"), "{h}");
        let (h, b) = raw(&s, "HEAD /f HTTP/1.1\r\n\r\n");
        assert!(h.contains("Content-Length: 10") && b.is_empty(), "{h}");
        assert_eq!(s.hits("/f"), 5);
        assert_eq!(s.requests()[2].path, "/f?x=1");
        assert_eq!(s.requests()[1].header("Range"), Some("bytes=4-"));
    }

    #[test]
    fn injects_faults() {
        let s = FixtureServer::start();
        s.serve("/cut", b"abcdefgh".to_vec(), Behavior::CutOnceAfter(3));
        let (h, b) = get(&s, "/cut", "");
        assert!(h.contains("Content-Length: 8"), "{h}");
        assert_eq!(b, b"abc");
        assert_eq!(get(&s, "/cut", "").1, b"abcdefgh");

        s.serve("/every", b"abcdefgh".to_vec(), Behavior::CutEveryAfter(3));
        assert_eq!(get(&s, "/every", "Range: bytes=3-\r\n").1, b"def");

        s.serve("/ign", b"abcdefgh".to_vec(), Behavior::IgnoreRange);
        let (h, b) = get(&s, "/ign", "Range: bytes=3-\r\n");
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        assert_eq!(b, b"abcdefgh");

        s.serve("/bad", b"abcdefgh".to_vec(), Behavior::Corrupt);
        let b = get(&s, "/bad", "").1;
        assert_eq!(b.len(), 8);
        assert_ne!(b, b"abcdefgh");

        s.serve("/gone", b"x".to_vec(), Behavior::Status(503));
        assert!(get(&s, "/gone", "").0.starts_with("HTTP/1.1 503"));

        s.serve(
            "/slow",
            vec![7u8; 300],
            Behavior::Slow {
                bytes_per_sec: 1000,
            },
        );
        let t = std::time::Instant::now();
        assert_eq!(get(&s, "/slow", "").1.len(), 300);
        assert!(t.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn records_uploads() {
        let s = FixtureServer::start();
        let (h, _) = raw(
            &s,
            "POST /events/aa?x=1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(h.starts_with("HTTP/1.1 204"), "{h}");
        let r = &s.requests()[0];
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("POST", "/events/aa?x=1", &b"hello"[..])
        );
        assert_eq!(s.hits("/events/aa"), 0);
    }

    #[test]
    fn sha256_helper() {
        assert_eq!(
            crate::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
