//! Connections between requests wait in one epoll set, and a few worker threads (one per core)
//! serve whichever have bytes: under load one wake-up serves several connections, where a thread
//! per connection costs two thread switches per request (measured: a quarter of the CPU time of
//! a boot storm).
//!
//! The workers only take the fast path: a request complete in what one read returned, answered
//! by an in-memory reply the socket takes at once. Anything else — a partial or slow request,
//! `Expect: 100-continue`, a file, a client that does not read its replies, an error reply —
//! moves the connection to a thread of its own running [`super::serve_connection`], the bounded
//! blocking path with its deadlines. Parked connections idle longer than the request timeout are
//! closed by [`Pool::sweep`].

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Instant,
};

use super::{
    linger, log_request,
    request::{complete, read_request, wants_keep_alive, Pending, Stop},
    response::{encode, write_response},
    serve_connection, Channel, Conn, Handler, LiveGuard, Request, Response, ServerOptions,
};
use crate::log;

/// Parked connections are spread over this many maps so that workers rarely share a lock.
const SHARDS: usize = 16;

/// A connection and what is known about it between requests.
pub(super) struct Open<C> {
    // First, so it drops first: the slot is free before the client sees the close. A client
    // that connects again at once must not find its old slot still taken (and an idle
    // connection evicted for it).
    pub guard: LiveGuard,
    pub conn: C,
    pub pending: Pending,
    pub peer: IpAddr,
    pub local: SocketAddr,
}

/// Token → parked connection and since when.
type Shard<C> = Mutex<HashMap<u64, (Open<C>, Instant)>>;

pub(super) struct Pool<C: Conn> {
    epoll: OwnedFd,
    parked: Vec<Shard<C>>,
    next: AtomicU64,
    handler: Arc<dyn Handler>,
    options: ServerOptions,
    channel: Channel,
    stop: Arc<AtomicBool>,
}

/// What the thread that takes a connection off the fast path must do first.
enum First {
    Nothing,
    /// Send the rest of a reply, then close unless the connection is kept alive.
    Rest(Vec<u8>, bool),
    /// Write a reply (a file), log it with its outcome when `log` says so, then as above.
    Reply {
        response: Response,
        keep_alive: bool,
        head_only: bool,
        log: Option<Box<(Request, Instant)>>,
    },
    /// Answer an unusable request with this status and reason, then close.
    Refuse(u16, String),
}

impl<C: Conn> Pool<C> {
    pub fn start(
        handler: Arc<dyn Handler>,
        options: ServerOptions,
        channel: Channel,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Arc<Pool<C>>> {
        // SAFETY: epoll_create1 has no preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pool = Arc::new(Pool {
            // SAFETY: a new descriptor nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            parked: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next: AtomicU64::new(0),
            handler,
            options,
            channel,
            stop,
        });
        let workers = thread::available_parallelism().map_or(2, |n| n.get().max(2));
        for _ in 0..workers {
            let p = pool.clone();
            thread::Builder::new()
                .name("worker".into())
                .spawn(move || p.work())?;
        }
        Ok(pool)
    }

    /// A new connection: parked until it sends something.
    pub fn add(&self, open: Open<C>) {
        let _ = open.conn.set_nonblocking(false);
        let _ = open
            .conn
            .set_write_timeout(Some(self.options.write_timeout));
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.park(token, open, libc::EPOLL_CTL_ADD);
    }

    fn shard(&self, token: u64) -> &Shard<C> {
        &self.parked[token as usize % SHARDS]
    }

    fn park(&self, token: u64, open: Open<C>, op: libc::c_int) {
        let fd = open.conn.as_raw_fd();
        // In the map before the event is armed: the worker that gets it finds the connection.
        self.shard(token)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, (open, Instant::now()));
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: valid epoll and socket descriptors and event pointer.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) } != 0 {
            log!("cannot watch a connection: {}", io::Error::last_os_error());
            self.take(token);
        }
    }

    fn take(&self, token: u64) -> Option<Open<C>> {
        let mut shard = self.shard(token).lock().unwrap_or_else(|p| p.into_inner());
        shard.remove(&token).map(|(open, _)| open)
    }

    /// Closes the connection parked longest (from `peer` only, when given); false when none is
    /// parked. Parked connections are idle: between requests, or not yet sent anything.
    pub fn evict_idle(&self, peer: Option<IpAddr>) -> bool {
        let mut oldest: Option<(Instant, u64)> = None;
        for shard in &self.parked {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (token, (open, since)) in shard.iter() {
                let eligible = peer.is_none_or(|p| open.guard.peer() == p);
                if eligible && oldest.is_none_or(|(t, _)| *since < t) {
                    oldest = Some((*since, *token));
                }
            }
        }
        // Dropped here: the socket closes and its slot is free when this returns.
        oldest.and_then(|(_, token)| self.take(token)).is_some()
    }

    /// Closes connections that idled longer than the request timeout.
    pub fn sweep(&self) {
        for shard in &self.parked {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, (_, since)| since.elapsed() < self.options.request_timeout);
        }
    }

    fn work(self: Arc<Self>) {
        // SAFETY: epoll_event is plain data; zeroed is a valid value.
        let mut events = [unsafe { std::mem::zeroed::<libc::epoll_event>() }; 8];
        while !self.stop.load(Ordering::SeqCst) {
            // SAFETY: the buffer holds `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    200,
                )
            };
            for ev in events.iter().take(n.max(0) as usize) {
                let token = ev.u64;
                if let Some(open) = self.take(token) {
                    // A handler that panics loses its connection, never a worker (as a thread
                    // per connection lost only itself).
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.serve(token, open)
                    }));
                    if served.is_err() {
                        log!("a request handler panicked; its connection was closed");
                    }
                }
            }
        }
        // Workers leaving at shutdown close the connections still parked.
        for shard in &self.parked {
            shard.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// The fast path: requests that are complete in the buffer, replies the socket takes whole.
    /// One read per turn: a connection whose client sends again at once goes back to the set
    /// rather than keep this worker from the others.
    fn serve(&self, token: u64, mut open: Open<C>) {
        match recv_now(&open.conn, &mut open.pending.buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        loop {
            if open.pending.buf.is_empty() {
                return self.park(token, open, libc::EPOLL_CTL_MOD);
            }
            if !complete(&open.pending.buf) {
                return self.hand_off(open, First::Nothing);
            }
            let deadline = Instant::now() + self.options.request_timeout;
            let (peer, local) = (open.peer, open.local);
            let request = match read_request(
                &mut open.conn,
                &mut open.pending,
                (deadline, self.options.head_timeout),
                peer,
                local,
                self.channel,
            ) {
                Ok(r) => r,
                Err(Stop::Quiet) => return,
                Err(Stop::Reply(status, msg)) => {
                    return self.hand_off(open, First::Refuse(status, msg))
                }
            };
            let keep_alive = wants_keep_alive(&request);
            let started = Instant::now();
            let response = self.handler.handle(&request);
            let status = response.status;
            let is_head = request.method == "HEAD";
            let bytes = match encode(response, keep_alive, is_head) {
                Ok(bytes) => bytes,
                Err(file) => {
                    let log = self
                        .options
                        .access_log
                        .then(|| Box::new((request, started)));
                    let first = First::Reply {
                        response: file,
                        keep_alive,
                        head_only: is_head,
                        log,
                    };
                    return self.hand_off(open, first);
                }
            };
            let sent = send_now(&open.conn, &bytes);
            if self.options.access_log {
                let result = sent
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| io::Error::new(e.kind(), e.to_string()));
                log_request(peer, &request, status, started, &result);
            }
            match sent {
                Ok(n) if n == bytes.len() => {}
                Ok(n) => return self.hand_off(open, First::Rest(bytes[n..].to_vec(), keep_alive)),
                Err(_) => return,
            }
            if !keep_alive {
                return;
            }
        }
    }

    /// Moves a connection to a thread of its own (the blocking path).
    fn hand_off(&self, open: Open<C>, first: First) {
        let (handler, options, channel) =
            (self.handler.clone(), self.options.clone(), self.channel);
        let peer = open.peer;
        let spawned = thread::Builder::new()
            .name("conn".into())
            .stack_size(512 * 1024)
            .spawn(move || {
                let Open {
                    mut conn,
                    pending,
                    peer,
                    local,
                    guard,
                } = open;
                // Declared after `conn`, so it drops before it: the slot is free first.
                let _guard = guard;
                let go_on = match first {
                    First::Nothing => true,
                    First::Rest(bytes, keep) => conn.write_all(&bytes).is_ok() && keep,
                    First::Reply {
                        response,
                        keep_alive,
                        head_only,
                        log,
                    } => {
                        let status = response.status;
                        let result = write_response(&mut conn, response, keep_alive, head_only);
                        if let Some(logged) = log {
                            let (request, started) = *logged;
                            log_request(peer, &request, status, started, &result);
                        }
                        result.is_ok() && keep_alive
                    }
                    First::Refuse(status, msg) => {
                        let _ =
                            write_response(&mut conn, Response::line(status, &msg), false, false);
                        linger(&mut conn);
                        if options.access_log {
                            log!("{peer} - {status} ({msg})");
                        }
                        false
                    }
                };
                if go_on {
                    serve_connection(
                        &mut conn, pending, peer, local, channel, &*handler, &options,
                    );
                }
            });
        if let Err(e) = spawned {
            // The closure (and its connection) was dropped: the client sees a reset.
            log!("cannot start a connection thread for {peer}: {e}");
        }
    }
}

/// One read that does not wait.
fn recv_now(conn: &impl Conn, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    loop {
        // SAFETY: reads at most `chunk.len()` bytes into a buffer we own.
        let n = unsafe {
            libc::recv(
                conn.as_raw_fd(),
                chunk.as_mut_ptr().cast(),
                chunk.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            buf.extend_from_slice(&chunk[..n as usize]);
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// One send that does not wait; returns how much the socket took.
fn send_now(conn: &impl Conn, bytes: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: sends from a buffer we own, at most its length.
        let n = unsafe {
            libc::send(
                conn.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}
