//! Bad and slow clients: random input, idle connections, connection floods, oversize heads.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{connect_from, Stack, MAC};
use pxelab_runtime::server::ServerOptions;

fn quick(max_connections: usize, timeout_ms: u64) -> ServerOptions {
    ServerOptions {
        max_connections,
        max_per_client: (max_connections / 8).max(1),
        request_timeout: Duration::from_millis(timeout_ms),
        head_timeout: Duration::from_millis(timeout_ms).min(ServerOptions::default().head_timeout),
        write_timeout: Duration::from_secs(2),
        access_log: false,
    }
}

/// A loopback address per `i`: as many distinct clients as a test needs.
fn client(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn healthz_from(s: &Stack, from: std::net::Ipv4Addr) -> u16 {
    common::raw_from(
        from,
        s.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .status
}

/// xorshift64*: deterministic, so a failure can be replayed from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn random_request(rng: &mut Rng) -> Vec<u8> {
    let methods = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "G\u{1}T", "", "get",
    ];
    let prefixes = [
        "/ipxe",
        "/config/",
        "/cloud-init/t1/",
        "/events/",
        "/images/",
        "/initrds/",
        "/status",
        "/vms/t1/",
        "/",
        "//",
        "/boot.ipxe",
    ];
    let pieces = [
        "..",
        "%2e%2e",
        "%2f",
        "%00",
        "52:54:00:aa:bb:01",
        "t1",
        "user-data",
        "?mac=",
        "&",
        "%",
        "%zz",
        "\\",
        "debian-12",
        "x86_64",
        "vmlinuz",
        "\u{7f}",
        "ü",
        " ",
        "#",
        "?",
        "=",
        "timeline",
    ];
    let mut target = rng.pick(&prefixes).to_string();
    for _ in 0..rng.below(6) {
        target.push_str(rng.pick(&pieces));
        if rng.below(3) == 0 {
            target.push('/');
        }
    }
    let mut req = format!(
        "{} {} HTTP/1.{}\r\n",
        rng.pick(&methods),
        target,
        rng.below(2)
    )
    .into_bytes();
    let headers = [
        "Host: pxe.test",
        "Host: ",
        "Range: bytes=0-3",
        "Range: bytes=-",
        "Range: bytes=9999999999999999999999-",
        "Connection: keep-alive",
        "Content-Length: 5",
        "Content-Length: -1",
        "Content-Length: 99999999",
        "Expect: 100-continue",
        "X: \u{ff}",
        "Transfer-Encoding: chunked",
        "Bad Header",
        ": x",
    ];
    for _ in 0..rng.below(5) {
        req.extend_from_slice(rng.pick(&headers).as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    match rng.below(4) {
        0 => req.extend_from_slice(br#"{"phase":"rootfs","bytes_done":1}"#),
        1 => {
            let n = rng.below(300);
            req.extend(rng.bytes(n))
        }
        _ => {}
    }
    if rng.below(10) == 0 {
        // Raw garbage instead of HTTP.
        let n = rng.below(200);
        req = rng.bytes(n);
    }
    req
}

/// Random paths, queries, headers and bodies: every request gets a well-formed reply (or a
/// clean close for garbage), never a 5xx, and the server answers /healthz throughout.
#[test]
fn fuzz_requests_never_break_the_server() {
    // A panicking server thread would only drop its connection (and in the release build,
    // with panic=abort, kill the stack): count them.
    static SERVER_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if matches!(
            std::thread::current().name(),
            Some("conn" | "accept" | "worker")
        ) {
            SERVER_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        previous(info);
    }));
    let s = Stack::with(quick(64, 100), true);
    let seed = 0x5eed_1234_u64;
    let mut rng = Rng(seed);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..1500 {
        let req = random_request(&mut rng);
        let mut stream = TcpStream::connect(s.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = stream.write_all(&req);
        let mut out = Vec::new();
        let started = Instant::now();
        let _ = stream.read_to_end(&mut out);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "request {i} (seed {seed:#x}) hung: {:?}",
            String::from_utf8_lossy(&req)
        );
        if let Some(reply) = common::parse_reply(&out) {
            assert!(
                reply.status < 500 || reply.status == 503,
                "request {i} got {}: {:?} -> {}",
                reply.status,
                String::from_utf8_lossy(&req),
                reply.text()
            );
            *statuses.entry(reply.status).or_insert(0) += 1;
        }
        if i % 100 == 0 {
            assert_eq!(
                s.get("/healthz").status,
                200,
                "server down after request {i}"
            );
        }
    }
    assert_eq!(s.get("/healthz").status, 200);
    assert_eq!(s.get(&format!("/ipxe?mac={MAC}")).status, 200);
    assert_eq!(
        SERVER_PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server panicked on input"
    );
    // The generator reached the interesting answers, not only 400s.
    for status in [200, 400, 404, 405] {
        assert!(
            statuses.contains_key(&status),
            "no {status} among {statuses:?}"
        );
    }
}

/// 200 idle connections (some mid-request) do not delay a normal request.
#[test]
fn idle_connections_do_not_starve_others() {
    let s = Stack::with(quick(512, 10_000), true);
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut c = connect_from(client(i), s.addr);
        if i % 2 == 0 {
            c.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").unwrap();
        }
        idle.push(c);
    }
    let started = Instant::now();
    let r = s.get(&format!("/ipxe?mac={MAC}"));
    let took = started.elapsed();
    eprintln!("request answered in {took:?} with 200 idle connections open");
    assert_eq!(r.status, 200);
    assert!(
        took < Duration::from_millis(500),
        "normal request took {took:?} behind 200 idle connections"
    );
    drop(idle);
}

/// Idle and slow clients are disconnected after the request timeout; a half-sent request gets 408.
#[test]
fn slow_clients_time_out() {
    let s = Stack::with(quick(64, 500), true);
    let mut silent = TcpStream::connect(s.addr).unwrap();
    let mut partial = TcpStream::connect(s.addr).unwrap();
    partial.write_all(b"GET /status HTTP/1.1\r\nHo").unwrap();
    // A slowloris that sends a byte every 200 ms stays within any per-read timeout; the deadline
    // covers the whole head.
    let mut drip = TcpStream::connect(s.addr).unwrap();
    let started = Instant::now();
    for b in b"GET /status HTTP/1.1\r\nX: yyyyyyyy" {
        if drip.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for c in [&mut silent, &mut partial, &mut drip] {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    let mut out = Vec::new();
    assert_eq!(
        silent.read_to_end(&mut out).unwrap(),
        0,
        "a silent client gets no reply, just a close"
    );
    let mut out = Vec::new();
    let _ = partial.read_to_end(&mut out);
    assert_eq!(common::parse_reply(&out).map(|r| r.status), Some(408));
    let mut out = Vec::new();
    let _ = drip.read_to_end(&mut out);
    assert_eq!(common::parse_reply(&out).map(|r| r.status), Some(408));
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Beyond the connection limit, with every connection busy (mid-request), new clients get a
/// quick 503 instead of a hang, and capacity comes back when connections close.
#[test]
fn connection_limit_answers_503() {
    let s = Stack::with(quick(8, 10_000), true);
    let held: Vec<TcpStream> = (0..8)
        .map(|i| {
            let mut c = connect_from(client(i), s.addr);
            c.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let r = s.get("/healthz");
    assert_eq!(r.status, 503);
    r.assert_one_line();
    assert!(started.elapsed() < Duration::from_secs(1));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.get("/healthz").status != 200 {
        assert!(Instant::now() < deadline, "capacity did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The issue's reproduction: one client opens every slot with half-sent requests. Its own
/// connections are capped, so every other client is still served.
#[test]
fn one_client_cannot_hold_every_slot() {
    let s = Stack::with(quick(40, 10_000), true);
    let rogue = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut c = connect_from(rogue, s.addr);
        let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHo");
        held.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        assert_eq!(healthz_from(&s, client(i)), 200, "client {i} locked out");
    }
    // The rogue holds its share (an eighth); the rest were closed (503, or closed while idle).
    let mut open = 0;
    for c in &mut held {
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut out = Vec::new();
        let still = c
            .read_to_end(&mut out)
            .is_err_and(|e| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        if still && out.is_empty() {
            open += 1;
        }
    }
    assert_eq!(open, 5, "the rogue's connections still open");
}

/// When every slot holds an idle connection (kept alive, or opened and silent), a new client is
/// served: the one idle longest is closed for it.
#[test]
fn idle_connections_are_evicted_for_new_clients() {
    let s = Stack::with(quick(8, 10_000), true);
    let mut idle: Vec<TcpStream> = (0..8).map(|i| connect_from(client(i), s.addr)).collect();
    // One of them kept alive after a request, as a booting machine's would be.
    idle[3]
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..3 {
        assert_eq!(healthz_from(&s, client(100 + i)), 200, "new client {i}");
    }
    let mut closed = Vec::new();
    for (i, c) in idle.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => {
                    closed.push(i);
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    // The first new client took the oldest silent one's slot; the others found it free.
    assert_eq!(closed, [0]);
}

/// A request head must be complete within a few seconds of its first byte, however long the
/// request timeout (which also bounds idle keep-alive connections).
#[test]
fn a_half_sent_head_times_out_quickly() {
    let s = Stack::with(
        ServerOptions {
            access_log: false,
            ..ServerOptions::default()
        },
        true,
    );
    assert!(ServerOptions::default().request_timeout >= Duration::from_secs(10));
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    assert_eq!(common::parse_reply(&out).map(|r| r.status), Some(408));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "408 after {:?}",
        started.elapsed()
    );
}

/// RFC 9112: a Content-Length that is repeated, signed or not a plain number is refused; it
/// could frame the body differently for a proxy in front and for us.
#[test]
fn ambiguous_content_lengths_are_refused() {
    let s = Stack::new();
    let token = s.boot();
    let body = r#"{"phase":"installing"}"#;
    assert_eq!(body.len(), 22);
    for headers in [
        "Content-Length: 22\r\nContent-Length: 22",
        "Content-Length: 22\r\nContent-Length: 2",
        "Content-Length: +22",
        "Content-Length: 22, 22",
        "Content-Length: 0x16",
        "Content-Length: ",
    ] {
        let r = s.raw(&format!(
            "POST /events/{MAC}?token={token} HTTP/1.1\r\nHost: x\r\n{headers}\r\nConnection: close\r\n\r\n{body}"
        ));
        assert_eq!(r.status, 400, "{headers:?}: {}", r.text());
        r.assert_one_line();
    }
    assert_eq!(
        s.phases("t1"),
        ["ipxe"],
        "a refused request reached the timeline"
    );
}

#[test]
fn oversize_heads_are_refused() {
    let s = Stack::new();
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(20_000));
    let r = s.raw(&long);
    assert_eq!(r.status, 431);
    r.assert_one_line();
    let mut many = String::from("GET /healthz HTTP/1.1\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(s.raw(&many).status, 431);
    assert_eq!(s.raw("GARBAGE\r\n\r\n").status, 400);
    assert_eq!(s.get("/healthz").status, 200);
}

/// A client that stops reading a large download is dropped after the write timeout and does
/// not hold the server.
#[test]
fn stalled_download_is_dropped() {
    let s = Stack::with(
        ServerOptions {
            write_timeout: Duration::from_millis(500),
            access_log: false,
            ..ServerOptions::default()
        },
        true,
    );
    let big = s.root().join("images/debian-12/x86_64/big.bin");
    // Sparse: far more than the socket buffers on both sides can hold (tcp_rmem may be 32 MiB).
    const SIZE: u64 = 512 * 1024 * 1024;
    std::fs::File::create(&big).unwrap().set_len(SIZE).unwrap();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"GET /images/debian-12/x86_64/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.get("/healthz").status, 200);
    // The server gave up: reading now ends long before 32 MiB arrive.
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(
        (total as u64) < SIZE,
        "the whole file arrived ({total} bytes): no write timeout"
    );
}

/// Pipelined requests filling more than one read of the server (16 KiB of 64-byte requests, so
/// a read may end exactly between two) are all answered: a ready connection is reported once,
/// so the server must read again on its own while reads come back full.
#[test]
fn pipelined_requests_beyond_one_read_are_all_answered() {
    let s = Stack::with(quick(64, 10_000), true);
    let mut one = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    one.resize(60, b'p');
    one.extend_from_slice(b"\r\n\r\n");
    assert_eq!(one.len(), 64);
    const COUNT: usize = 256;
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(&one.repeat(COUNT)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1 << 16];
    let started = Instant::now();
    while got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count() < COUNT {
        match c.read(&mut buf) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "{e} after {:?}: {} of {COUNT} replies",
                started.elapsed(),
                got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count()
            ),
        }
    }
}

/// A client that sends its request and then closes its side gets the reply and the server's
/// close at once, not when the idle connection would be swept.
#[test]
fn a_client_that_closes_its_side_gets_the_reply_and_the_close() {
    let s = Stack::with(quick(64, 10_000), true);
    for _ in 0..20 {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let started = Instant::now();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply)
            .unwrap_or_else(|e| panic!("no close after {:?}: {e}", started.elapsed()));
        assert!(reply.starts_with(b"HTTP/1.1 200 OK"), "{reply:?}");
    }
}
