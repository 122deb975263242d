//! A complete reply and how it goes on the wire: the head and an in-memory body in one write,
//! or a file range with zero-copy `sendfile(2)`.

use std::{
    fs::File,
    io::{self, Write as _},
    time::Duration,
};

use super::Conn;

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

    pub(super) fn body_len(&self) -> u64 {
        match &self.body {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
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

/// Writes the head of `response` on the wire into `out`.
fn write_head(response: &Response, keep_alive: bool, out: &mut Vec<u8>) {
    let status = response.status;
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nServer: pxelab\r\n",
        reason(status)
    );
    for (name, value) in &response.headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "Content-Length: {}\r\n", response.body_len());
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
}

/// A reply with an in-memory body: its head is written into `head` (cleared first, so a worker
/// reuses one buffer for every reply) and its body returned, to go out together in one
/// `sendmsg` without being copied behind the head; a file reply is given back.
pub(super) fn encode(
    response: Response,
    keep_alive: bool,
    head_only: bool,
    head: &mut Vec<u8>,
) -> Result<Vec<u8>, Response> {
    head.clear();
    write_head(&response, keep_alive, head);
    match response.body {
        Body::Bytes(_) if head_only => Ok(Vec::new()),
        Body::Bytes(bytes) => Ok(bytes),
        Body::File { .. } => Err(response),
    }
}

pub(super) fn write_response(
    stream: &mut impl Conn,
    response: Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(256);
    match encode(response, keep_alive, head_only, &mut head) {
        Ok(body) => {
            head.extend_from_slice(&body);
            stream.write_all(&head)?
        }
        Err(response) => {
            stream.write_all(&head)?;
            if let (false, Body::File { file, start, len }) = (head_only, response.body) {
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
