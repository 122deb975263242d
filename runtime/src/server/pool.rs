//! Connections between requests wait in epoll sets, one per worker thread (one worker per
//! core), and each worker serves whichever of its connections have bytes: under load one wake-up
//! serves several connections, where a thread per connection costs two thread switches per
//! request (measured: a quarter of the CPU time of a boot storm). A connection belongs to one
//! worker for its life, as in nginx: its socket stays in that worker's set, level-triggered, so
//! serving a request costs no re-arming syscall and no hand-over between threads.
//!
//! The workers only take the fast path: a request complete in what one read returned, answered
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
        atomic::{AtomicBool, AtomicUsize, Ordering},
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

/// A place in a worker's table; its index is the connection's epoll token.
enum Place<C> {
    Free,
    /// Waiting for bytes, since then.
    Idle(Open<C>, Instant),
    /// Being served by the worker (not idle: never evicted or swept).
    Busy,
}

/// A worker's connections by token, with the free places to reuse.
struct Table<C> {
    places: Vec<Place<C>>,
    free: Vec<usize>,
}

impl<C> Table<C> {
    fn release(&mut self, token: usize) -> Option<Open<C>> {
        match std::mem::replace(&mut self.places[token], Place::Free) {
            Place::Free => None,
            Place::Idle(open, _) => {
                self.free.push(token);
                Some(open)
            }
            Place::Busy => {
                self.free.push(token);
                None
            }
        }
    }
}

/// One worker's epoll set and the connections in it.
struct Worker<C> {
    epoll: OwnedFd,
    table: Mutex<Table<C>>,
}

impl<C> Worker<C> {
    fn table(&self) -> MutexGuard<'_, Table<C>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) struct Pool<C: Conn> {
    workers: Vec<Worker<C>>,
    /// Which worker gets the next new connection.
    next: AtomicUsize,
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
        let count = thread::available_parallelism().map_or(2, |n| n.get().max(2));
        let mut workers = Vec::with_capacity(count);
        for _ in 0..count {
            // SAFETY: epoll_create1 has no preconditions; the result is checked.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            workers.push(Worker {
                // SAFETY: a new descriptor nothing else owns.
                epoll: unsafe { OwnedFd::from_raw_fd(fd) },
                table: Mutex::new(Table {
                    places: Vec::new(),
                    free: Vec::new(),
                }),
            });
        }
        let pool = Arc::new(Pool {
            workers,
            next: AtomicUsize::new(0),
            handler,
            options,
            channel,
            stop,
        });
        for w in 0..count {
            let p = pool.clone();
            thread::Builder::new()
                .name("worker".into())
                .spawn(move || p.work(w))?;
        }
        Ok(pool)
    }

    /// A new connection: idle in a worker's set until it sends something.
    pub fn add(&self, open: Open<C>) {
        let _ = open.conn.set_nonblocking(false);
        let _ = open
            .conn
            .set_write_timeout(Some(self.options.write_timeout));
        let worker = &self.workers[self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len()];
        let fd = open.conn.as_raw_fd();
        let token = {
            let mut table = worker.table();
            // In the table before it is watched: the worker that sees its event finds it.
            let place = Place::Idle(open, Instant::now());
            match table.free.pop() {
                Some(token) => {
                    table.places[token] = place;
                    token
                }
                None => {
                    table.places.push(place);
                    table.places.len() - 1
                }
            }
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: token as u64,
        };
        // SAFETY: valid epoll and socket descriptors and event pointer.
        let added =
            unsafe { libc::epoll_ctl(worker.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if added != 0 {
            log!("cannot watch a connection: {}", io::Error::last_os_error());
            let closed = worker.table().release(token);
            drop(closed);
        }
    }

    /// Closes the connection idle longest (from `peer` only, when given); false when none is
    /// idle. Idle connections are between requests, or have not sent anything yet.
    pub fn evict_idle(&self, peer: Option<IpAddr>) -> bool {
        let mut oldest: Option<(Instant, usize, usize)> = None;
        for (w, worker) in self.workers.iter().enumerate() {
            for (token, place) in worker.table().places.iter().enumerate() {
                if let Place::Idle(open, since) = place {
                    let eligible = peer.is_none_or(|p| open.guard.peer() == p);
                    if eligible && oldest.is_none_or(|(t, _, _)| *since < t) {
                        oldest = Some((*since, w, token));
                    }
                }
            }
        }
        let Some((since, w, token)) = oldest else {
            return false;
        };
        let mut table = self.workers[w].table();
        // Still the same idle connection: it was not served (nor replaced) in between.
        if !matches!(&table.places[token], Place::Idle(_, s) if *s == since) {
            return false;
        }
        // Dropped here: the socket closes (leaving the epoll set) and its slot is free when
        // this returns.
        table.release(token).is_some()
    }

    /// Closes connections that idled longer than the request timeout.
    pub fn sweep(&self) {
        for worker in &self.workers {
            let mut table = worker.table();
            for token in 0..table.places.len() {
                if matches!(&table.places[token], Place::Idle(_, since)
                    if since.elapsed() >= self.options.request_timeout)
                {
                    table.release(token);
                }
            }
        }
    }

    fn work(self: Arc<Self>, w: usize) {
        let worker = &self.workers[w];
        // SAFETY: epoll_event is plain data; zeroed is a valid value.
        let mut events = [unsafe { std::mem::zeroed::<libc::epoll_event>() }; 32];
        // The head of every reply, reused.
        let mut head = Vec::with_capacity(512);
        while !self.stop.load(Ordering::SeqCst) {
            // SAFETY: the buffer holds `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(
                    worker.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    200,
                )
            };
            for ev in events.iter().take(n.max(0) as usize) {
                let token = ev.u64 as usize;
                let open = {
                    let mut table = worker.table();
                    let Some(place) = table.places.get_mut(token) else {
                        continue;
                    };
                    // An event of a connection evicted since is skipped; one for a newer
                    // connection in its place costs a read that finds nothing.
                    match std::mem::replace(place, Place::Busy) {
                        Place::Idle(open, _) => open,
                        other => {
                            *place = other;
                            continue;
                        }
                    }
                };
                // A handler that panics loses its connection, never a worker (as a thread
                // per connection lost only itself).
                let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.serve(worker, open, &mut head)
                }));
                let kept = served.unwrap_or_else(|_| {
                    log!("a request handler panicked; its connection was closed");
                    None
                });
                let mut table = worker.table();
                match kept {
                    Some(open) => table.places[token] = Place::Idle(open, Instant::now()),
                    None => {
                        table.release(token);
                    }
                }
            }
        }
        // Workers leaving at shutdown close the connections still idle.
        let mut table = worker.table();
        for token in 0..table.places.len() {
            table.release(token);
        }
    }

    /// The fast path: requests that are complete in the buffer, replies the socket takes whole.
    /// One read per turn: a connection whose client sends again at once waits for the next
    /// turn rather than keep this worker from the others. Gives the connection back when it
    /// stays with this worker.
    fn serve(&self, worker: &Worker<C>, mut open: Open<C>, head: &mut Vec<u8>) -> Option<Open<C>> {
        match recv_now(&open.conn, &mut open.pending.buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
        loop {
            if open.pending.buf.is_empty() {
                return Some(open);
            }
            if !complete(&open.pending.buf) {
                return self.hand_off(worker, open, First::Nothing);
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
                    return self.hand_off(worker, open, First::Refuse(status, msg))
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
                    return self.hand_off(worker, open, first);
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
                    return self.hand_off(worker, open, First::Rest(rest, keep_alive));
                }
                Err(_) => return None,
            }
            if !keep_alive {
                return None;
            }
        }
    }

    /// Moves a connection to a thread of its own (the blocking path).
    fn hand_off(&self, worker: &Worker<C>, open: Open<C>, first: First) -> Option<Open<C>> {
        // Out of the worker's set first: its thread alone reads it from now on.
        let fd = open.conn.as_raw_fd();
        // SAFETY: valid epoll and socket descriptors; DEL ignores the event pointer.
        unsafe {
            libc::epoll_ctl(
                worker.epoll.as_raw_fd(),
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
