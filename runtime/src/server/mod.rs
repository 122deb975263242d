//! The HTTP/1.1 transport: accept loop, workers for ready connections, a bounded thread for each
//! slow one, deadlines.
//!
//! Why not `tiny_http::Server`: its accept loop spawns an unbounded thread per connection with no
//! way to set socket timeouts (a client that connects and says nothing holds a thread forever),
//! and the first `accept()` error (e.g. EMFILE under a connection flood) ends its accept loop for
//! good. Here `httparse` parses, and this module owns the sockets:
//! - at most `max_connections` live connections, and at most `max_per_client` from one address
//!   (on the network; the control socket has one local user), so one client cannot hold every
//!   slot; when full, the connection idle longest (kept alive between requests, or opened and
//!   silent) is closed for the new one, and only when none is idle is the new one answered `503`;
//! - a request head must be complete within `head_timeout` of its first byte and the whole
//!   request within `request_timeout`, and a kept-alive connection may idle at most that long,
//!   so slow or stuck clients go away;
//! - a write that makes no progress for `write_timeout` drops the connection;
//! - accept errors are logged and retried; nothing a client sends can stop the loop.
//!
//! Handlers see a complete [`Request`] and return a complete [`Response`], so an error can never
//! leave half a reply on the wire. This module owns the sockets and the blocking connection
//! loop; `pool` serves ready connections without a thread each, `request` reads and parses
//! one request, `response` writes one reply.

mod pool;
mod request;
mod response;

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::AsRawFd,
        unix::net::{UnixListener, UnixStream},
    },
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use crate::log;

use pool::{Open, Pool};
use request::{read_request, wants_keep_alive, Pending, Stop};
pub use request::{Channel, Request, MAX_BODY, MAX_HEAD};
use response::write_response;
pub use response::{Body, Response};

#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub max_connections: usize,
    /// Most connections from one client address (network only).
    pub max_per_client: usize,
    pub request_timeout: Duration,
    /// How long a request head may take from its first byte (at most `request_timeout`).
    pub head_timeout: Duration,
    pub write_timeout: Duration,
    /// Log one line per request.
    pub access_log: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 512,
            max_per_client: 64,
            request_timeout: Duration::from_secs(10),
            // A client sends its head in one go: a few seconds is generous even under TCG.
            head_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(30),
            access_log: true,
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
    /// What requests accepted here are told they came in on.
    const CHANNEL: Channel;
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
    const CHANNEL: Channel = Channel::Network;
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
    const CHANNEL: Channel = Channel::Control;
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
    let pool = match Pool::<L::Conn>::start(handler, options.clone(), L::CHANNEL, stop.clone()) {
        Ok(pool) => pool,
        Err(e) => {
            log!("cannot start the connection workers: {e}");
            return;
        }
    };
    let slots = Arc::new(Slots::default());
    let per_client = match L::CHANNEL {
        Channel::Network => options.max_per_client.max(1),
        Channel::Control => usize::MAX,
    };
    let mut last_error_log: Option<Instant> = None;
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            pool.sweep();
        }
        match listener.accept_conn() {
            Ok((conn, peer)) => {
                // Freeing a slot closes an idle connection, whose guard gives the slot back now.
                if slots.of(peer) >= per_client && !pool.evict_idle(Some(peer)) {
                    refuse_busy(
                        conn,
                        &format!("{per_client} connections from {peer} are open"),
                    );
                    continue;
                }
                if slots.total() >= options.max_connections && !pool.evict_idle(None) {
                    refuse_busy(
                        conn,
                        &format!("{} connections are open", options.max_connections),
                    );
                    continue;
                }
                let local = conn.local().unwrap_or(addr);
                pool.add(Open {
                    conn,
                    pending: Pending::default(),
                    peer,
                    local,
                    guard: slots.take(peer),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&listener, 100),
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

/// How often idle connections are looked for.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Live connections, in all and by client address.
#[derive(Default)]
struct Slots {
    total: AtomicUsize,
    by_peer: Mutex<HashMap<IpAddr, usize>>,
}

impl Slots {
    fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    fn of(&self, peer: IpAddr) -> usize {
        let by_peer = self.by_peer.lock().unwrap_or_else(|p| p.into_inner());
        by_peer.get(&peer).copied().unwrap_or(0)
    }

    fn take(self: &Arc<Self>, peer: IpAddr) -> LiveGuard {
        self.total.fetch_add(1, Ordering::SeqCst);
        *self
            .by_peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_insert(0) += 1;
        LiveGuard {
            slots: self.clone(),
            peer,
        }
    }
}

/// One connection's slot, given back when the connection is dropped.
struct LiveGuard {
    slots: Arc<Slots>,
    peer: IpAddr,
}

impl LiveGuard {
    fn peer(&self) -> IpAddr {
        self.peer
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.slots.total.fetch_sub(1, Ordering::SeqCst);
        let mut by_peer = self.slots.by_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                by_peer.remove(&self.peer);
            }
        }
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

fn refuse_busy(mut stream: impl Conn, why: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let body = format!("server busy: {why}, retry shortly\n");
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

/// The blocking path: serves a connection on its own thread until it closes or times out.
fn serve_connection(
    stream: &mut impl Conn,
    mut pending: Pending,
    peer_ip: IpAddr,
    local: SocketAddr,
    channel: Channel,
    handler: &dyn Handler,
    options: &ServerOptions,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(options.write_timeout));
    loop {
        let deadline = Instant::now() + options.request_timeout;
        let request = match read_request(
            stream,
            &mut pending,
            (deadline, options.head_timeout),
            peer_ip,
            local,
            channel,
        ) {
            Ok(r) => r,
            Err(Stop::Quiet) => return,
            Err(Stop::Reply(status, msg)) => {
                let _ = write_response(stream, Response::line(status, &msg), false, false);
                linger(stream);
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
        let result = write_response(stream, response, keep_alive, is_head);
        if options.access_log {
            log_request(peer_ip, &request, status, started, &result);
        }
        if result.is_err() || !keep_alive {
            return;
        }
    }
}

/// One access-log line.
fn log_request(
    peer: IpAddr,
    request: &Request,
    status: u16,
    started: Instant,
    result: &io::Result<()>,
) {
    let target = if request.query.is_empty() {
        request.path.clone()
    } else {
        format!("{}?{}", request.path, request.query)
    };
    let outcome = match result {
        Ok(()) => String::new(),
        Err(e) => format!(" (write failed: {e})"),
    };
    log!(
        "{peer} {} {} {status} {}ms{outcome}",
        request.method,
        clip(&target, 200),
        started.elapsed().as_millis()
    );
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
