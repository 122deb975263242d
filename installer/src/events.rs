//! Posting [`Event`]s to the boot handler without slowing the install.
//!
//! Events go through a bounded queue to one background thread. Progress is coalesced (at most
//! one per [`PROGRESS_EVERY`], and dropped when the queue is full); a failed post is logged and
//! forgotten. Only the final `installed`/`failed` event is sent synchronously, after the queue has
//! drained or a short deadline passed, so it is always the last one the server sees; `installed`
//! is retried until the stack acknowledges it ([`UNTIL_ACKNOWLEDGED`]), because until then the
//! stack would answer the machine's next network boot with another install.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pxelab_contract::{Event, Phase};

use crate::http::{Backoff, Http, PostError};
use crate::say;

pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const QUEUE: usize = 64;
const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the final event waits for queued ones before going out anyway.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// How a final event is retried: `backoff` between attempts, none started after `give_up_after`.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub backoff: Backoff,
    pub give_up_after: Duration,
}

/// For `installed`: long enough to outlast a `lab stack restart` or a reloaded stack image.
pub const UNTIL_ACKNOWLEDGED: Retry = Retry {
    backoff: Backoff {
        first: Duration::from_secs(1),
        max: Duration::from_secs(10),
    },
    give_up_after: Duration::from_secs(600),
};

/// What became of a final event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The stack answered 2xx.
    Acknowledged { attempts: u32 },
    /// The stack answered 4xx (e.g. 409: the machine is not installing): final.
    Refused(String),
    /// No acknowledgement before the retries ran out: the last failure.
    Unanswered { error: String, attempts: u32 },
}

/// Queues progress events, at most one per [`PROGRESS_EVERY`] plus the final one.
pub struct ProgressSender {
    tx: Option<SyncSender<Event>>,
    start: Instant,
    phase: Phase,
    total: u64,
    last: Option<Instant>,
}

impl ProgressSender {
    pub fn update(&mut self, done: u64) {
        let now = Instant::now();
        let last = done >= self.total;
        if !last && self.last.is_some_and(|t| now - t < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(now);
        let event = Event {
            phase: self.phase,
            bytes_done: Some(done),
            bytes_total: Some(self.total),
            elapsed_ms: Some(millis(self.start.elapsed())),
            ..Event::default()
        };
        enqueue(self.tx.as_ref(), event);
    }
}

/// Never blocks: a full queue means the server is slow, and the install must not wait for it.
fn enqueue(tx: Option<&SyncSender<Event>>, event: Event) {
    let Some(tx) = tx else { return };
    match tx.try_send(event) {
        Ok(()) => {}
        Err(TrySendError::Full(event)) => {
            say!(
                "events: queue full (server slow?), dropped a {} event",
                event.phase
            );
        }
        Err(TrySendError::Disconnected(_)) => {}
    }
}

pub struct Reporter {
    tx: Option<SyncSender<Event>>,
    done: Receiver<()>,
    worker: Option<JoinHandle<()>>,
    http: Http,
    url: String,
    start: Instant,
}

impl Reporter {
    /// Starts the background poster. `start` is when the installer started (events carry
    /// `elapsed_ms` relative to it).
    pub fn start(http: Http, url: &str, start: Instant) -> Reporter {
        let (tx, rx) = mpsc::sync_channel::<Event>(QUEUE);
        let (done_tx, done) = mpsc::channel();
        let worker = {
            let http = http.clone();
            let url = url.to_string();
            std::thread::spawn(move || {
                let mut failures = 0u32;
                for event in rx {
                    post(&http, &url, &event, &mut failures);
                }
                let _ = done_tx.send(());
            })
        };
        Reporter {
            tx: Some(tx),
            done,
            worker: Some(worker),
            http,
            url: url.to_string(),
            start,
        }
    }

    fn stamp(&self, mut event: Event) -> Event {
        event.elapsed_ms = Some(millis(self.start.elapsed()));
        event
    }

    /// Queues a phase-boundary event: `phase` ended after `duration`.
    pub fn phase(&mut self, phase: Phase, duration: Duration, message: String) {
        let event = self.stamp(Event {
            phase,
            message,
            duration_ms: Some(millis(duration)),
            ..Event::default()
        });
        self.enqueue(event);
    }

    /// A handle for progress events of `phase` (moved into the stream's progress callback).
    pub fn progress(&self, phase: Phase, total: u64) -> ProgressSender {
        ProgressSender {
            tx: self.tx.clone(),
            start: self.start,
            phase,
            total,
            last: None,
        }
    }

    fn enqueue(&mut self, event: Event) {
        enqueue(self.tx.as_ref(), event);
    }

    /// Sends the final event (`installed` or `failed`, lasting `duration` in all) after the
    /// queued ones, waiting at most a few seconds for them; retried as `retry` says (once without).
    pub fn finish(mut self, duration: Duration, event: Event, retry: Option<Retry>) -> Delivery {
        let event = self.stamp(Event {
            duration_ms: Some(millis(duration)),
            ..event
        });
        self.tx = None;
        match self.done.recv_timeout(DRAIN_DEADLINE) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(worker) = self.worker.take() {
                    let _ = worker.join();
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                say!("events: earlier events still pending; sending the final one now")
            }
        }
        deliver(&self.http, &self.url, &event, retry)
    }
}

/// Posts `event` until the stack acknowledges or refuses it, or `retry` runs out.
fn deliver(http: &Http, url: &str, event: &Event, retry: Option<Retry>) -> Delivery {
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        Err(e) => {
            return Delivery::Unanswered {
                error: format!("cannot encode a {} event: {e}", event.phase),
                attempts: 0,
            }
        }
    };
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let error = match http.post_json(url, &body, POST_TIMEOUT) {
            Ok(()) => return Delivery::Acknowledged { attempts },
            Err(PostError::Refused(why)) => return Delivery::Refused(why),
            Err(PostError::Failed(error)) => error,
        };
        let pause = match retry {
            Some(r) if started.elapsed() < r.give_up_after => r.backoff.delay(attempts - 1),
            _ => return Delivery::Unanswered { error, attempts },
        };
        say!(
            "events: {error}; the {} report is not acknowledged yet, retrying in {:.0} s (attempt {attempts})",
            event.phase,
            pause.as_secs_f64()
        );
        std::thread::sleep(pause);
    }
}

fn post(http: &Http, url: &str, event: &Event, failures: &mut u32) {
    let body = match serde_json::to_vec(event) {
        Ok(body) => body,
        Err(e) => return say!("events: cannot encode a {} event: {e}", event.phase),
    };
    match http.post_json(url, &body, POST_TIMEOUT) {
        Ok(()) => *failures = 0,
        Err(e) => {
            // One line per streak of failures: a down server must not flood the console.
            if *failures == 0 {
                say!("events: {e} (not fatal; install continues)");
            }
            *failures += 1;
        }
    }
}

pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Backoff;
    use pxelab_tests::FixtureServer;

    fn posted(server: &FixtureServer) -> Vec<Event> {
        server
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| serde_json::from_slice(&r.body).unwrap())
            .collect()
    }

    #[test]
    fn events_arrive_in_order_with_the_final_one_last() {
        let server = FixtureServer::start();
        let http = Http::new(0, Backoff::DEFAULT);
        let mut r = Reporter::start(
            http,
            &server.url("/events/52-54-00-00-00-01"),
            Instant::now(),
        );
        r.phase(Phase::Installing, Duration::from_millis(5), String::new());
        let mut progress = r.progress(Phase::Rootfs, 100);
        for i in 0..=100 {
            progress.update(i);
        }
        drop(progress);
        r.phase(Phase::Rootfs, Duration::from_millis(7), String::new());
        r.finish(
            Duration::from_millis(20),
            Event {
                phase: Phase::Installed,
                message: "done".into(),
                host_keys: vec!["ssh-ed25519 AAAA".into()],
                ..Event::default()
            },
            None,
        );
        let events = posted(&server);
        let phases: Vec<Phase> = events.iter().map(|e| e.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Installing,
                Phase::Rootfs,
                Phase::Rootfs,
                Phase::Rootfs,
                Phase::Installed
            ]
        );
        assert_eq!(
            events[1].bytes_done,
            Some(0),
            "first progress goes out, the next 99 are coalesced"
        );
        assert_eq!(events[2].bytes_done, Some(100));
        assert_eq!(events[3].duration_ms, Some(7));
        assert_eq!(events[4].message, "done");
        assert_eq!(events[4].duration_ms, Some(20));
        assert_eq!(events[4].host_keys, ["ssh-ed25519 AAAA"]);
        assert!(server
            .requests()
            .iter()
            .all(|r| r.path == "/events/52-54-00-00-00-01"));
    }

    #[test]
    fn an_unreachable_server_does_not_stall_the_caller() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let http = Http::new(0, Backoff::DEFAULT);
        let t = Instant::now();
        let mut r = Reporter::start(
            http,
            &format!("http://127.0.0.1:{port}/events/x"),
            Instant::now(),
        );
        for _ in 0..200 {
            r.phase(Phase::Disk, Duration::ZERO, String::new());
        }
        r.finish(
            Duration::ZERO,
            Event {
                phase: Phase::Failed,
                ..Event::default()
            },
            None,
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    }

    /// A one-shot HTTP server answering each connection with the next of `script` (`None`:
    /// hang up without answering), then 200; it returns how many connections it took.
    fn scripted(script: Vec<Option<u16>>) -> (String, JoinHandle<u32>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/events/x", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let mut script = script.into_iter();
            let mut taken = 0;
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                taken += 1;
                let answer = script.next();
                let Some(status) = answer.unwrap_or(Some(200)) else {
                    continue;
                };
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).unwrap();
                    assert!(n > 0, "client hung up mid-request");
                    head.extend_from_slice(&buf[..n]);
                }
                let body = format!("answer {status}\n");
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(reply.as_bytes()).unwrap();
                if answer.is_none() || status != 503 {
                    return taken;
                }
            }
            taken
        });
        (url, server)
    }

    const FAST: Retry = Retry {
        backoff: Backoff {
            first: Duration::from_millis(10),
            max: Duration::from_millis(40),
        },
        give_up_after: Duration::from_secs(30),
    };

    fn installed() -> Event {
        Event {
            phase: Phase::Installed,
            ..Event::default()
        }
    }

    #[test]
    fn installed_is_retried_until_the_stack_acknowledges_it() {
        let (url, server) = scripted(vec![None, Some(503), None, Some(503)]);
        let r = Reporter::start(Http::new(0, Backoff::DEFAULT), &url, Instant::now());
        let delivery = r.finish(Duration::ZERO, installed(), Some(FAST));
        assert_eq!(delivery, Delivery::Acknowledged { attempts: 5 });
        assert_eq!(server.join().unwrap(), 5);
    }

    #[test]
    fn a_refusal_is_final_and_says_why() {
        let (url, server) = scripted(vec![Some(503), Some(409)]);
        let r = Reporter::start(Http::new(0, Backoff::DEFAULT), &url, Instant::now());
        let delivery = r.finish(Duration::ZERO, installed(), Some(FAST));
        assert_eq!(
            delivery,
            Delivery::Refused(format!(
                "POST {url}: server answered 409 Conflict: answer 409"
            ))
        );
        assert_eq!(server.join().unwrap(), 2, "not retried after the 409");
    }

    #[test]
    fn an_unacknowledged_event_ends_after_the_retry_budget() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/events/x");
        let r = Reporter::start(Http::new(0, Backoff::DEFAULT), &url, Instant::now());
        let retry = Retry {
            give_up_after: Duration::from_millis(200),
            ..FAST
        };
        match r.finish(Duration::ZERO, installed(), Some(retry)) {
            Delivery::Unanswered { error, attempts } => {
                assert!(attempts > 2, "{attempts}");
                assert!(error.starts_with(&format!("POST {url}: ")), "{error}");
            }
            other => panic!("{other:?}"),
        }
    }
}
