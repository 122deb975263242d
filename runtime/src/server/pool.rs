//! Connections between requests wait in one epoll set that all workers (one per core) wait on,
//! and whichever worker is free serves whichever connections have bytes: under load one wake-up
//! serves several connections, where a thread per connection costs two thread switches per
//! request (measured: a quarter of the CPU time of a boot storm). No connection belongs to a
//! worker: when one is descheduled (by the clients, the journal's compaction, anything else on
//! the machine) the others serve the ready connections, instead of those waiting for it as they
//! did when each worker had a set of its own (p99 at 10,000 machines × 16 connections went from
//! 2.2 to 12 ms with that, 4.5× nginx's). The sockets are edge-triggered: a request costs no
//! re-arming syscall; a worker that gets an event for a connection another is serving leaves it
//! a note to read again ([`Place::Busy`]), so no readiness is lost.
//!
//! The workers only take the fast path: a request complete in what the socket held, answered
//! by an in-memory reply the socket takes at once. Anything else — a partial or slow request,
//! `Expect: 100-continue`, a file, a client that does not read its replies, an error reply —
//! moves the connection to a thread of its own running [`super::serve_connection`], the bounded
//! blocking path with its deadlines. Idle connections (between requests, or not yet sent
//! anything) idle longer than the request timeout are closed by [`Pool::sweep`], and the accept
//! thread closes the one idle longest when it needs a slot ([`Pool::evict_idle`]).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
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

/// A place in the pool's table; its index is the connection's epoll token.
enum Place<C> {
    Free,
    /// Waiting for bytes, since then.
    Idle(Open<C>, Instant),
    /// Being served by a worker (not idle: never evicted or swept). `again`: the flags of
    /// events that came in meanwhile, which edge-triggered epoll will not report twice, so the
    /// worker reads again before it lets the connection go idle.
    Busy {
        again: Option<u32>,
    },
}

pub(super) struct Pool<C: Conn> {
    /// One set for all workers: a ready connection is served by whichever worker is free.
    epoll: OwnedFd,
    /// A place for every connection that may be open (the accept loop keeps to that).
    places: Box<[Mutex<Place<C>>]>,
    free: Mutex<Vec<usize>>,
    handler: Arc<dyn Handler>,
    options: ServerOptions,
    channel: Channel,
    stop: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

/// Events one `epoll_wait` takes: few, so that a worker descheduled with events in hand holds
/// few connections back from the others (storm A/B on a loaded 2-core machine, 10,000 machines
/// × 16 connections, p99 over nginx's: 0.37 at 4, 0.58 at 32; CPU per request 12.4 and 12.0 µs).
const EVENTS: usize = 4;

/// How long a worker serves without finding a moment of idleness before it lets the other
/// runnable threads of its core go first (`sched_yield`). Under a sustained storm a worker always
/// finds another ready connection and would keep its core for a whole scheduler slice
/// (milliseconds), and what shares the core — dnsmasq answering the same machines' DHCP, the
/// journal, clients on the same host — waits that long. Storm A/B on a 2-core machine (10,000
/// machines, wrk on the same cores, 6 × 3 s interleaved, medians), without and with: 16
/// connections p99 3.48 → 1.38 ms (nginx 1.09), p90 0.70 → 0.33 ms, requests/s unchanged
/// (74,400 and 74,800). In a sweep of the quantum 200 µs beat 20, 50 and 500 µs.
const YIELD_AFTER: std::time::Duration = std::time::Duration::from_micros(200);

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
        let workers = thread::available_parallelism().map_or(2, |n| n.get().max(2));
        // A worker that closed a connection gives its place back just after its slot: the
        // accept loop may admit a new one in between.
        let size = options.max_connections.max(1) + workers;
        let pool = Arc::new(Pool {
            // SAFETY: a new descriptor nothing else owns.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            places: (0..size).map(|_| Mutex::new(Place::Free)).collect(),
            free: Mutex::new((0..size).rev().collect()),
            handler,
            options,
            channel,
            stop,
        });
        for _ in 0..workers {
            let p = pool.clone();
            thread::Builder::new()
                .name("worker".into())
                .spawn(move || p.work())?;
        }
        Ok(pool)
    }

    /// A new connection: idle in the set until it sends something.
    pub fn add(&self, open: Open<C>) {
        let _ = open.conn.set_nonblocking(false);
        let _ = open
            .conn
            .set_write_timeout(Some(self.options.write_timeout));
        let fd = open.conn.as_raw_fd();
        let Some(token) = lock(&self.free).pop() else {
            // The accept loop admits at most `max_connections`: a bug if this happens.
            log!("no place for a new connection; closed it");
            return;
        };
        // In its place before it is watched: the worker that sees its event finds it.
        *lock(&self.places[token]) = Place::Idle(open, Instant::now());
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token as u64,
        };
        // SAFETY: valid epoll and socket descriptors and event pointer. Bytes that arrived
        // before this are reported at once.
        let added =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if added != 0 {
            log!("cannot watch a connection: {}", io::Error::last_os_error());
            drop(self.release(token, |_| true));
        }
    }

    /// Frees `token`'s place when it holds an idle connection `which` accepts, and returns that
    /// connection (dropping it closes the socket, which leaves the set).
    fn release(&self, token: usize, which: impl FnOnce(Instant) -> bool) -> Option<Open<C>> {
        let open = {
            let mut place = lock(&self.places[token]);
            if !matches!(&*place, Place::Idle(_, since) if which(*since)) {
                return None;
            }
            match std::mem::replace(&mut *place, Place::Free) {
                Place::Idle(open, _) => open,
                _ => return None,
            }
        };
        lock(&self.free).push(token);
        Some(open)
    }

    /// Closes the connection idle longest (from `peer` only, when given); false when none is
    /// idle. Idle connections are between requests, or have not sent anything yet.
    pub fn evict_idle(&self, peer: Option<IpAddr>) -> bool {
        let mut oldest: Option<(Instant, usize)> = None;
        for (token, place) in self.places.iter().enumerate() {
            if let Place::Idle(open, since) = &*lock(place) {
                let eligible = peer.is_none_or(|p| open.guard.peer() == p);
                if eligible && oldest.is_none_or(|(t, _)| *since < t) {
                    oldest = Some((*since, token));
                }
            }
        }
        let Some((since, token)) = oldest else {
            return false;
        };
        // Only the same idle connection: it was not served (nor replaced) in between. Dropped
        // here: its slot is free when this returns.
        self.release(token, |s| s == since).is_some()
    }

    /// Closes connections that idled longer than the request timeout.
    pub fn sweep(&self) {
        for token in 0..self.places.len() {
            drop(self.release(token, |since| {
                since.elapsed() >= self.options.request_timeout
            }));
        }
    }

    fn work(self: Arc<Self>) {
        // SAFETY: epoll_event is plain data; zeroed is a valid value.
        let mut events = [unsafe { std::mem::zeroed::<libc::epoll_event>() }; EVENTS];
        // The head of every reply, reused.
        let mut head = Vec::with_capacity(512);
        // Since when this worker has found work every time it looked.
        let mut busy_since = Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            let mut n = self.wait(&mut events, 0);
            if n == 0 {
                n = self.wait(&mut events, 200);
                busy_since = Instant::now();
            }
            for ev in events.iter().take(n) {
                self.ready(ev.u64 as usize, ev.events, &mut head);
            }
            if busy_since.elapsed() >= YIELD_AFTER {
                // SAFETY: no preconditions.
                unsafe { libc::sched_yield() };
                busy_since = Instant::now();
            }
        }
        // Workers leaving at shutdown close the connections still idle.
        for token in 0..self.places.len() {
            drop(self.release(token, |_| true));
        }
    }

    /// Takes the ready events into `events`, waiting up to `timeout_ms` for one; their count.
    fn wait(&self, events: &mut [libc::epoll_event; EVENTS], timeout_ms: i32) -> usize {
        // SAFETY: the buffer holds `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        n.max(0) as usize
    }

    /// Serves the connection of an event (`flags`), unless another worker is serving it: that
    /// one is told to read again.
    fn ready(&self, token: usize, mut flags: u32, head: &mut Vec<u8>) {
        let Some(place) = self.places.get(token) else {
            return;
        };
        let mut open = {
            let mut place = lock(place);
            match std::mem::replace(&mut *place, Place::Busy { again: None }) {
                Place::Idle(open, _) => open,
                // An event of a connection closed since (the place free or taken by a newer
                // one, which then costs a read that finds nothing).
                Place::Free => {
                    *place = Place::Free;
                    return;
                }
                Place::Busy { again } => {
                    *place = Place::Busy {
                        again: Some(again.unwrap_or(0) | flags),
                    };
                    return;
                }
            }
        };
        loop {
            let hup = flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
            // A handler that panics loses its connection, never a worker (as a thread per
            // connection lost only itself).
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.serve(open, head, hup)
            }));
            let kept = served.unwrap_or_else(|_| {
                log!("a request handler panicked; its connection was closed");
                None
            });
            let mut place = lock(place);
            let Some(kept) = kept else {
                *place = Place::Free;
                drop(place);
                lock(&self.free).push(token);
                return;
            };
            if let Place::Busy { again: Some(more) } = &*place {
                flags = *more;
                *place = Place::Busy { again: None };
                open = kept;
                continue;
            }
            *place = Place::Idle(kept, Instant::now());
            return;
        }
    }

    /// The fast path: requests that are complete in the buffer, replies the socket takes whole.
    /// Reads again while a read fills its buffer (edge-triggered: bytes already there are not
    /// reported again), and after the client's end of stream (`hup`) until it is reached. Gives
    /// the connection back when it stays in the set.
    fn serve(&self, mut open: Open<C>, head: &mut Vec<u8>, hup: bool) -> Option<Open<C>> {
        loop {
            let more = match recv_now(&open.conn, &mut open.pending.buf) {
                Ok(0) => return None,
                Ok(n) => n == RECV_CHUNK || hup,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(_) => return None,
            };
            while !open.pending.buf.is_empty() {
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
                    Err(Stop::Quiet) => return None,
                    Err(Stop::Reply(status, msg)) => {
                        return self.hand_off(open, First::Refuse(status, msg))
                    }
                };
                let keep_alive = wants_keep_alive(&request);
                let started = Instant::now();
                let response = self.handler.handle(&request);
                let status = response.status;
                let is_head = request.method == "HEAD";
                let body = match encode(response, keep_alive, is_head, head) {
                    Ok(body) => body,
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
                let sent = send_now(&open.conn, head, &body);
                if self.options.access_log {
                    let result = sent
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| io::Error::new(e.kind(), e.to_string()));
                    log_request(peer, &request, status, started, &result);
                }
                let total = head.len() + body.len();
                match sent {
                    Ok(n) if n == total => {}
                    Ok(n) => {
                        let mut rest = Vec::with_capacity(total - n);
                        if n < head.len() {
                            rest.extend_from_slice(&head[n..]);
                            rest.extend_from_slice(&body);
                        } else {
                            rest.extend_from_slice(&body[n - head.len()..]);
                        }
                        return self.hand_off(open, First::Rest(rest, keep_alive));
                    }
                    Err(_) => return None,
                }
                if !keep_alive {
                    return None;
                }
            }
            if !more {
                return Some(open);
            }
        }
    }

    /// Moves a connection to a thread of its own (the blocking path).
    fn hand_off(&self, open: Open<C>, first: First) -> Option<Open<C>> {
        // Out of the set first: its thread alone reads it from now on.
        let fd = open.conn.as_raw_fd();
        // SAFETY: valid epoll and socket descriptors; DEL ignores the event pointer.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
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
        None
    }
}

/// What one read takes at most.
const RECV_CHUNK: usize = 8192;

/// One read that does not wait.
fn recv_now(conn: &impl Conn, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; RECV_CHUNK];
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

/// One send of `head` then `body` that does not wait; returns how much the socket took.
fn send_now(conn: &impl Conn, head: &[u8], body: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut libc::c_void,
            iov_len: body.len(),
        },
    ];
    // SAFETY: msghdr is plain data; zeroed is a valid value (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    loop {
        // SAFETY: the iovecs point into buffers we own, at most their lengths; sendmsg only
        // reads them.
        let n = unsafe {
            libc::sendmsg(
                conn.as_raw_fd(),
                &msg,
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
