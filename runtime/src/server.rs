//! The HTTP/1.1 transport: accept loop, one bounded thread per connection, deadlines.
//!
//! Why not `tiny_http::Server`: its accept loop spawns an unbounded thread per connection with no
//! way to set socket timeouts (a client that connects and says nothing holds a thread forever),
//! and the first `accept()` error (e.g. EMFILE under a connection flood) ends its accept loop for
//! good. Here `httparse` parses, and this module owns the sockets:
//! - at most `max_connections` live connections; one more is answered `503` and closed at once;
//! - a request head (and body) must arrive within `request_timeout` of the first byte, and a
//!   kept-alive connection may idle at most that long, so slow or stuck clients go away;
//! - a write that makes no progress for `write_timeout` drops the connection;
//! - accept errors are logged and retried; nothing a client sends can stop the loop.
//!
//! Handlers see a complete [`Request`] and return a complete [`Response`], so an error can never
//! leave half a reply on the wire.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::log;

/// Longest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest request body accepted (events are a few hundred bytes).
pub const MAX_BODY: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub max_connections: usize,
    pub request_timeout: Duration,
    pub write_timeout: Duration,
    /// Log one line per request.
    pub access_log: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 512,
            request_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            access_log: true,
        }
    }
}

/// A complete, parsed request.
#[derive(Debug)]
pub struct Request {
    /// `GET`, `HEAD`, `POST`, … exactly as sent.
    pub method: String,
    /// The request target up to `?`, still percent-encoded.
    pub path: String,
    /// The part after `?` (without it), still percent-encoded; empty when absent.
    pub query: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: IpAddr,
    /// The address the client connected to (the fallback for URLs we hand out).
    pub local: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub enum Body {
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from `start`.
    File {
        file: File,
        start: u64,
        len: u64,
    },
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type", content_type.to_string())],
            body: Body::Bytes(body),
        }
    }

    /// An error or short text reply: exactly one line.
    pub fn line(status: u16, text: &str) -> Response {
        let mut one: String = text.lines().collect::<Vec<_>>().join(" ");
        one.push('\n');
        Response::new(status, "text/plain; charset=utf-8", one.into_bytes())
    }

    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Response::new(status, "application/json", body)
            }
            Err(e) => Response::line(500, &format!("internal error: cannot serialize reply: {e}")),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    fn body_len(&self) -> u64 {
        match &self.body {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request) -> Response;
}

impl<F: Fn(&Request) -> Response + Send + Sync + 'static> Handler for F {
    fn handle(&self, request: &Request) -> Response {
        self(request)
    }
}

/// A running server; dropping it does not stop it, [`Server::shutdown`] does.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `handler` on `listener` from a background accept thread.
    pub fn start(
        listener: TcpListener,
        handler: Arc<dyn Handler>,
        options: ServerOptions,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        Server::spawn(listener, addr, handler, options)
    }

    /// Serves `handler` on a Unix socket: the local control channel (a peer there is reported
    /// as 127.0.0.1, and `addr` is the public address that URLs in replies name).
    pub fn start_unix(
        listener: UnixListener,
        addr: SocketAddr,
        handler: Arc<dyn Handler>,
        options: ServerOptions,
    ) -> io::Result<Server> {
        Server::spawn(listener, addr, handler, options)
    }

    fn spawn<L: Listen>(
        listener: L,
        addr: SocketAddr,
        handler: Arc<dyn Handler>,
        options: ServerOptions,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(listener, addr, handler, options, stop2))?;
        Ok(Server {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (within ~200 ms) and closes the listening socket. Connections in progress
    /// finish on their own threads, bounded by the timeouts.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listening socket the accept loop can serve: TCP for the network, Unix for local control.
trait Listen: AsRawFd + Send + 'static {
    type Conn: Conn;
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
    /// A new connection and the peer's IP.
    fn accept_conn(&self) -> io::Result<(Self::Conn, IpAddr)>;
}

/// A connected stream; the methods are the inherent ones of `TcpStream` and `UnixStream`.
trait Conn: Read + Write + AsRawFd + Send + 'static {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn write_timeout(&self) -> io::Result<Option<Duration>>;
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
    fn shutdown_write(&self);
    /// The address the client connected to, where the socket has one.
    fn local(&self) -> Option<SocketAddr>;
}

impl Listen for TcpListener {
    type Conn = TcpStream;
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        TcpListener::set_nonblocking(self, on)
    }
    fn accept_conn(&self) -> io::Result<(TcpStream, IpAddr)> {
        let (stream, peer) = self.accept()?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.ip().to_canonical()))
    }
}

impl Listen for UnixListener {
    type Conn = UnixStream;
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixListener::set_nonblocking(self, on)
    }
    fn accept_conn(&self) -> io::Result<(UnixStream, IpAddr)> {
        let (stream, _) = self.accept()?;
        Ok((stream, IpAddr::V4(Ipv4Addr::LOCALHOST)))
    }
}

macro_rules! conn_impl {
    ($t:ty, $local:expr) => {
        impl Conn for $t {
            fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, t)
            }
            fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_write_timeout(self, t)
            }
            fn write_timeout(&self) -> io::Result<Option<Duration>> {
                <$t>::write_timeout(self)
            }
            fn set_nonblocking(&self, on: bool) -> io::Result<()> {
                <$t>::set_nonblocking(self, on)
            }
            fn shutdown_write(&self) {
                let _ = self.shutdown(std::net::Shutdown::Write);
            }
            fn local(&self) -> Option<SocketAddr> {
                let local: fn(&$t) -> Option<SocketAddr> = $local;
                local(self)
            }
        }
    };
}
conn_impl!(TcpStream, |s| s.local_addr().ok());
conn_impl!(UnixStream, |_| None);

fn accept_loop<L: Listen>(
    listener: L,
    addr: SocketAddr,
    handler: Arc<dyn Handler>,
    options: ServerOptions,
    stop: Arc<AtomicBool>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let mut last_error_log: Option<Instant> = None;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept_conn() {
            Ok((stream, peer)) => {
                if live.load(Ordering::SeqCst) >= options.max_connections {
                    refuse_busy(stream, options.max_connections);
                    continue;
                }
                live.fetch_add(1, Ordering::SeqCst);
                let guard = LiveGuard(live.clone());
                let (handler, options) = (handler.clone(), options.clone());
                let spawned = thread::Builder::new()
                    .name("conn".into())
                    .stack_size(512 * 1024)
                    .spawn(move || {
                        let _guard = guard;
                        let local = stream.local().unwrap_or(addr);
                        serve_connection(stream, peer, local, &*handler, &options);
                    });
                if let Err(e) = spawned {
                    // The closure (and its guard and stream) was dropped: the client sees a reset.
                    log!("cannot start a connection thread for {peer}: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&listener, 200),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: the pending connection stays queued, so back off
                // instead of spinning, and log at most once a second.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    log!("accept failed (will retry): {e}");
                    last_error_log = Some(Instant::now());
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn wait_readable(listener: &impl AsRawFd, timeout_ms: i32) {
    let mut fds = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fds, 1, timeout_ms) };
}

fn refuse_busy(mut stream: impl Conn, limit: usize) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let body = format!("server busy: {limit} connections open, retry shortly\n");
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
    // Briefly drain what the client sent so the close is a FIN, not a RST that could destroy
    // the reply (bounded: this runs on the accept thread).
    stream.shutdown_write();
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// Why a connection ends early; each maps to a final error reply (or silence).
enum Stop {
    /// The client closed, timed out before sending anything, or the socket failed.
    Quiet,
    Reply(u16, String),
}

fn serve_connection(
    mut stream: impl Conn,
    peer_ip: IpAddr,
    local: SocketAddr,
    handler: &dyn Handler,
    options: &ServerOptions,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(options.write_timeout));
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let deadline = Instant::now() + options.request_timeout;
        let request = match read_request(&mut stream, &mut buf, deadline, peer_ip, local) {
            Ok(r) => r,
            Err(Stop::Quiet) => return,
            Err(Stop::Reply(status, msg)) => {
                let _ = write_response(&mut stream, Response::line(status, &msg), false, false);
                linger(&mut stream);
                if options.access_log {
                    log!("{peer_ip} - {status} ({msg})");
                }
                return;
            }
        };
        let keep_alive = wants_keep_alive(&request);
        let started = Instant::now();
        let response = handler.handle(&request);
        let status = response.status;
        let is_head = request.method == "HEAD";
        let result = write_response(&mut stream, response, keep_alive, is_head);
        if options.access_log {
            let target = if request.query.is_empty() {
                request.path.clone()
            } else {
                format!("{}?{}", request.path, request.query)
            };
            let outcome = match &result {
                Ok(()) => String::new(),
                Err(e) => format!(" (write failed: {e})"),
            };
            log!(
                "{peer_ip} {} {} {status} {}ms{outcome}",
                request.method,
                clip(&target, 200),
                started.elapsed().as_millis()
            );
        }
        if result.is_err() || !keep_alive {
            return;
        }
    }
}

/// Closes after an early error reply without destroying it: closing a socket that still has
/// unread request bytes makes the kernel send RST, and the client may then lose our reply. So
/// half-close, and discard what the client still sends for a short while.
fn linger(stream: &mut impl Conn) {
    stream.shutdown_write();
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut sink = [0u8; 8192];
    let mut total = 0usize;
    while total < 1024 * 1024 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

fn clip(s: &str, max: usize) -> String {
    let printable: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if printable.chars().count() <= max {
        printable
    } else {
        printable.chars().take(max).collect::<String>() + "…"
    }
}

fn wants_keep_alive(request: &Request) -> bool {
    let conn = request
        .header("connection")
        .unwrap_or("")
        .to_ascii_lowercase();
    let http10 = request.header(":version").is_some_and(|v| v == "1.0");
    if http10 {
        conn.split(',').any(|t| t.trim() == "keep-alive")
    } else {
        !conn.split(',').any(|t| t.trim() == "close")
    }
}

/// Reads until `buf` holds a complete head, then the body; leaves pipelined bytes in `buf`.
fn read_request(
    stream: &mut impl Conn,
    buf: &mut Vec<u8>,
    deadline: Instant,
    peer: IpAddr,
    local: SocketAddr,
) -> Result<Request, Stop> {
    let head_len = loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(buf) {
                Ok(httparse::Status::Complete(n)) => break n,
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Stop::Reply(
                        431,
                        "too many request headers (at most 64)".into(),
                    ))
                }
                Err(e) => return Err(Stop::Reply(400, format!("malformed HTTP request: {e}"))),
            }
            if buf.len() >= MAX_HEAD {
                return Err(Stop::Reply(
                    431,
                    format!("request head larger than {MAX_HEAD} bytes"),
                ));
            }
        }
        match read_some(stream, buf, deadline, MAX_HEAD) {
            Ok(0) => return Err(Stop::Quiet),
            Ok(_) => {}
            Err(e) if is_timeout(&e) && !buf.is_empty() => {
                return Err(Stop::Reply(408, "request not received in time".into()))
            }
            Err(_) => return Err(Stop::Quiet),
        }
    };

    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(buf), Ok(httparse::Status::Complete(_))) {
        return Err(Stop::Reply(400, "malformed HTTP request".into()));
    }
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("");
    let version = parsed.version.unwrap_or(1);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.to_string(), String::new()),
    };
    let mut owned = Vec::with_capacity(parsed.headers.len() + 1);
    for h in parsed.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| Stop::Reply(400, format!("header {} is not valid UTF-8", h.name)))?;
        owned.push((h.name.to_ascii_lowercase(), value.trim().to_string()));
    }
    // A pseudo-header keeps the version next to the other request facts.
    owned.push((
        ":version".to_string(),
        if version == 0 { "1.0" } else { "1.1" }.to_string(),
    ));
    buf.drain(..head_len);

    let mut request = Request {
        method,
        path,
        query,
        headers: owned,
        body: Vec::new(),
        peer,
        local,
    };
    if request.header("transfer-encoding").is_some() {
        return Err(Stop::Reply(
            411,
            "chunked request bodies are not accepted: send a Content-Length".into(),
        ));
    }
    let length = match request.header("content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| Stop::Reply(400, format!("invalid Content-Length {v:?}")))?,
    };
    if length > MAX_BODY {
        return Err(Stop::Reply(
            413,
            format!("request body of {length} bytes is over the limit of {MAX_BODY} bytes"),
        ));
    }
    if length > buf.len()
        && request
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    while buf.len() < length {
        match read_some(stream, buf, deadline, MAX_BODY + MAX_HEAD) {
            Ok(0) => return Err(Stop::Quiet),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return Err(Stop::Reply(408, "request body not received in time".into()))
            }
            Err(_) => return Err(Stop::Quiet),
        }
    }
    request.body = buf.drain(..length).collect();
    Ok(request)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One `read` bounded by what is left until `deadline`.
fn read_some(
    stream: &mut impl Conn,
    buf: &mut Vec<u8>,
    deadline: Instant,
    cap: usize,
) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    let mut chunk = [0u8; 8192];
    let room = cap.saturating_sub(buf.len()).clamp(1, chunk.len());
    loop {
        match stream.read(&mut chunk[..room]) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_response(
    stream: &mut impl Conn,
    response: Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: pxelab\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n", response.body_len()));
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = head.into_bytes();
    match response.body {
        Body::Bytes(bytes) => {
            if !head_only {
                out.extend_from_slice(&bytes);
            }
            stream.write_all(&out)?;
        }
        Body::File { file, start, len } => {
            stream.write_all(&out)?;
            if !head_only {
                let timeout = stream.write_timeout()?.unwrap_or(Duration::from_secs(30));
                stream.set_nonblocking(true)?;
                let sent = send_file(stream, &file, start, len, timeout);
                stream.set_nonblocking(false)?;
                sent?;
            }
        }
    }
    stream.flush()
}

/// Zero-copy `sendfile(2)` with our own stall timeout: SO_SNDTIMEO is not honoured by sendfile
/// here (a test caught a stalled reader being fed 512 MiB), so the socket is non-blocking and
/// every wait for room is a `poll` bounded by `timeout`.
fn send_file(
    stream: &impl Conn,
    file: &File,
    start: u64,
    len: u64,
    timeout: Duration,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut offset =
        libc::off_t::try_from(start).map_err(|_| io::Error::other("offset too large"))?;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 20) as usize;
        // SAFETY: both descriptors are open for the call; offset is a valid pointer.
        let n = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, chunk) };
        if n > 0 {
            left -= n as u64;
            continue;
        }
        if n == 0 {
            // The file shrank under us: the Content-Length already promised more.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than announced",
            ));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let mut fds = libc::pollfd {
                    fd: stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
                // SAFETY: one valid pollfd for the duration of the call.
                let ready = unsafe { libc::poll(&mut fds, 1, ms) };
                if ready == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client stopped reading",
                    ));
                }
            }
            _ => return Err(err),
        }
    }
    Ok(())
}
