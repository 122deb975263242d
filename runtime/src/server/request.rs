//! Reading one request off a connection: the head parsed by `httparse` within the deadline,
//! the body by `Content-Length` (bounded), pipelined bytes kept for the next request.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use super::Conn;

/// Longest request head (request line + headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest request body accepted (events are a few hundred bytes).
pub const MAX_BODY: usize = 16 * 1024;

/// Which listener a request came in on; routes that only local operators may use check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The HTTP port: the lab network, any client.
    Network,
    /// The control socket in the state directory: only users who may open that file.
    Control,
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
    pub channel: Channel,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a connection ends early; each maps to a final error reply (or silence).
pub(super) enum Stop {
    /// The client closed, timed out before sending anything, or the socket failed.
    Quiet,
    Reply(u16, String),
}

pub(super) fn wants_keep_alive(request: &Request) -> bool {
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

/// True when `buf` holds all a request parser needs without reading more: a complete head and
/// body, or enough to refuse it (a malformed or oversize head, a chunked or oversize body).
/// A request that announces `Expect: 100-continue` and has no body yet is not complete.
pub(super) fn complete(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let head = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return buf.len() >= MAX_HEAD,
        Err(_) => return true,
    };
    let lengths = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value);
    match content_length(lengths) {
        Ok(None) | Err(_) => true,
        Ok(Some(n)) => n > MAX_BODY || buf.len() - head >= n,
    }
}

/// The body length the `Content-Length` values announce. RFC 9112 §6.3: a repeated or
/// malformed one makes the framing ambiguous (a proxy in front could read it otherwise), so it
/// is an error; only plain digits count (no sign, no list).
pub(super) fn content_length<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<usize>, String> {
    let mut found = None;
    for value in values {
        if found.is_some() {
            return Err("more than one Content-Length".into());
        }
        let text = String::from_utf8_lossy(value);
        let v = text.trim_matches([' ', '\t']);
        let n = (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.parse::<usize>().ok())
            .flatten()
            .ok_or_else(|| format!("invalid Content-Length {:?}", clip(&text)))?;
        found = Some(n);
    }
    Ok(found)
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Reads until `pending` holds a complete head, then the body; leaves pipelined bytes there.
/// `limits`: when the whole request must be in, and how long its head may take from its first
/// byte (the wait for that first byte is bounded by the deadline alone: an idle keep-alive).
pub(super) fn read_request(
    stream: &mut impl Conn,
    pending: &mut Pending,
    limits: (Instant, Duration),
    peer: IpAddr,
    local: SocketAddr,
    channel: Channel,
) -> Result<Request, Stop> {
    let (deadline, head_timeout) = limits;
    let head_deadline = |started: Instant| deadline.min(started + head_timeout);
    let mut head_by = (!pending.buf.is_empty()).then(|| head_deadline(Instant::now()));
    let head_len = loop {
        if !pending.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(&pending.buf) {
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
            if pending.buf.len() >= MAX_HEAD {
                return Err(Stop::Reply(
                    431,
                    format!("request head larger than {MAX_HEAD} bytes"),
                ));
            }
        }
        match read_some(stream, pending, head_by.unwrap_or(deadline), MAX_HEAD) {
            Ok(0) => return Err(Stop::Quiet),
            Ok(_) => {
                head_by.get_or_insert_with(|| head_deadline(Instant::now()));
            }
            Err(e) if is_timeout(&e) && !pending.buf.is_empty() => {
                return Err(Stop::Reply(408, "request not received in time".into()))
            }
            Err(_) => return Err(Stop::Quiet),
        }
    };

    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(
        parsed.parse(&pending.buf),
        Ok(httparse::Status::Complete(_))
    ) {
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
    pending.buf.drain(..head_len);

    let mut request = Request {
        method,
        path,
        query,
        headers: owned,
        body: Vec::new(),
        peer,
        local,
        channel,
    };
    if request.header("transfer-encoding").is_some() {
        return Err(Stop::Reply(
            411,
            "chunked request bodies are not accepted: send a Content-Length".into(),
        ));
    }
    let lengths = request
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_bytes());
    let length = content_length(lengths)
        .map_err(|why| Stop::Reply(400, why))?
        .unwrap_or(0);
    if length > MAX_BODY {
        return Err(Stop::Reply(
            413,
            format!("request body of {length} bytes is over the limit of {MAX_BODY} bytes"),
        ));
    }
    if length > pending.buf.len()
        && request
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    while pending.buf.len() < length {
        match read_some(stream, pending, deadline, MAX_BODY + MAX_HEAD) {
            Ok(0) => return Err(Stop::Quiet),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return Err(Stop::Reply(408, "request body not received in time".into()))
            }
            Err(_) => return Err(Stop::Quiet),
        }
    }
    request.body = pending.buf.drain(..length).collect();
    Ok(request)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// What a connection keeps between reads: bytes not parsed yet (a pipelined request), and the
/// socket's read timeout as last set.
#[derive(Default)]
pub(super) struct Pending {
    pub buf: Vec<u8>,
    timeout: Option<Duration>,
}

/// One `read` bounded by what is left until `deadline`. The socket's timeout is set only when
/// it would let the read run more than [`SLACK`] past the deadline, so a keep-alive request
/// costs no `setsockopt`; a read that times out early is simply repeated.
fn read_some(
    stream: &mut impl Conn,
    pending: &mut Pending,
    deadline: Instant,
    cap: usize,
) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let room = cap.saturating_sub(pending.buf.len()).clamp(1, chunk.len());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if pending.timeout.is_none_or(|t| t > left + SLACK) {
            stream.set_read_timeout(Some(left))?;
            pending.timeout = Some(left);
        }
        match stream.read(&mut chunk[..room]) {
            Ok(n) => {
                pending.buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => pending.timeout = None,
            Err(e) => return Err(e),
        }
    }
}

/// How far past its deadline a read may block.
const SLACK: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use std::{io::Write, os::unix::net::UnixStream};

    use proptest::prelude::*;

    use super::*;

    /// `bytes` as a client sends them and then closes: the parsed request, or how it ended.
    fn read(bytes: &[u8], pending: &mut Pending) -> Result<Request, Stop> {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        client.write_all(bytes).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let limits = (
            Instant::now() + Duration::from_secs(2),
            Duration::from_secs(1),
        );
        let local: SocketAddr = "127.0.0.1:80".parse().unwrap();
        read_request(
            &mut server,
            pending,
            limits,
            local.ip(),
            local,
            Channel::Network,
        )
    }

    fn token() -> impl Strategy<Value = String> {
        "[A-Za-z0-9-]{1,12}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any bytes: a request or a refusal with a client-error status, never a panic.
        #[test]
        fn any_bytes_are_read_or_refused(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..600),
                "(GET|POST|HEAD) /[ -~]{0,30} HTTP/1\\.[01]\r\n([ -~]{0,30}\r\n){0,6}\r?\n?[ -~]{0,40}"
                    .prop_map(String::into_bytes),
            ],
        ) {
            let started = Instant::now();
            let _ = complete(&bytes);
            match read(&bytes, &mut Pending::default()) {
                Ok(r) => {
                    prop_assert!(!r.method.is_empty());
                    prop_assert!(r.body.len() <= MAX_BODY);
                }
                Err(Stop::Quiet) => {}
                Err(Stop::Reply(status, why)) => {
                    prop_assert!([400, 408, 411, 413, 431].contains(&status), "{status} {why}");
                }
            }
            prop_assert!(started.elapsed() < Duration::from_secs(3));
        }

        /// Well-formed requests, pipelined two at a time, come out as they went in.
        #[test]
        fn pipelined_requests_round_trip(
            method in "GET|POST|PUT",
            path in "/[a-z0-9/._-]{0,40}",
            query in proptest::option::of("[a-z]{1,5}=[a-z0-9%:]{0,20}"),
            headers in proptest::collection::vec((token(), "[ -~]{0,30}"), 0..8),
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let target = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let mut first = format!("{method} {target} HTTP/1.1\r\n");
            for (name, value) in &headers {
                if !["content-length", "transfer-encoding", "expect"]
                    .contains(&name.to_ascii_lowercase().as_str())
                {
                    first.push_str(&format!("{name}: {value}\r\n"));
                }
            }
            first.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            let mut bytes = first.into_bytes();
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut pending = Pending::default();
            let r = match read(&bytes, &mut pending) {
                Ok(r) => r,
                Err(Stop::Reply(status, why)) => {
                    return Err(TestCaseError::fail(format!("{status}: {why}")))
                }
                Err(Stop::Quiet) => return Err(TestCaseError::fail("closed")),
            };
            prop_assert_eq!(&r.method, &method);
            prop_assert_eq!(&r.path, &path);
            prop_assert_eq!(r.query, query.unwrap_or_default());
            prop_assert_eq!(r.body, body);
            prop_assert_eq!(pending.buf.as_slice(), &b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"[..]);
        }

        /// Exactly one plain number is a length; anything else is an error, never a guess.
        #[test]
        fn content_lengths_are_one_plain_number(values in proptest::collection::vec("[ 0-9+,x-]{0,8}", 0..3)) {
            let result = content_length(values.iter().map(|v| v.as_bytes()));
            match values.as_slice() {
                [] => prop_assert_eq!(result, Ok(None)),
                [one] => {
                    let digits = one.trim_matches(' ');
                    let plain = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
                    match result {
                        Ok(Some(n)) => prop_assert!(plain && digits.parse::<usize>() == Ok(n)),
                        Ok(None) => prop_assert!(false, "one value read as none"),
                        Err(_) => prop_assert!(!plain || digits.parse::<usize>().is_err()),
                    }
                }
                _ => prop_assert!(result.is_err()),
            }
        }
    }
}
