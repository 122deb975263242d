//! Plain-HTTP client for the installer (ureq without TLS: the lab network is trusted and every
//! download is pinned by sha256, so TLS would only add size), with bounded retries.

use std::io::Read;
use std::time::Duration;

use ureq::Agent;

use crate::say;

/// Largest small document (config, cloud-init files) the installer accepts.
const SMALL_LIMIT: u64 = 16 << 20;

/// Exponential backoff between retries: `first`, `2×first`, … capped at `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const DEFAULT: Backoff = Backoff {
        first: Duration::from_millis(250),
        max: Duration::from_secs(8),
    };

    /// The pause before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.min(16);
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// Why a GET failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GetError {
    /// The server answered 404: the document does not exist (never retried).
    #[error("{0} answered 404 Not Found")]
    NotFound(String),
    /// Anything else, after the retry budget was spent where retrying made sense.
    #[error("{0}")]
    Failed(String),
}

/// A response whose body can be streamed.
pub struct Opened {
    pub status: u16,
    pub content_length: Option<u64>,
    pub content_range: Option<String>,
    pub body: Box<dyn Read + Send>,
}

/// The installer's HTTP client. Cheap to clone (the agent shares its connection pool).
#[derive(Clone)]
pub struct Http {
    agent: Agent,
    /// Retries after the first attempt, for each request or resume.
    pub retries: u32,
    pub backoff: Backoff,
}

impl Http {
    pub fn new(retries: u32, backoff: Backoff) -> Http {
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("pxelab-installer/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            // A stalled stream is treated like a dropped one: the resumable reader re-requests.
            .timeout_per_read(Some(Duration::from_secs(20)))
            .build();
        Http {
            agent: Agent::new_with_config(config),
            retries,
            backoff,
        }
    }

    /// One GET request; `range_from > 0` asks for `bytes=<range_from>-`. No retries here.
    pub fn open(&self, url: &str, range_from: u64) -> Result<Opened, String> {
        let mut req = self.agent.get(url);
        if range_from > 0 {
            req = req.header("Range", format!("bytes={range_from}-"));
        }
        let resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_range = header("content-range");
        let status = resp.status().as_u16();
        let content_length = resp.body().content_length();
        Ok(Opened {
            status,
            content_length,
            content_range,
            body: Box::new(resp.into_body().into_reader()),
        })
    }

    /// GET a small document, retrying connection failures and 5xx answers with backoff.
    pub fn get_small(&self, url: &str) -> Result<Vec<u8>, GetError> {
        let mut attempt = 0;
        loop {
            let failure = match self.agent.get(url).call() {
                Ok(resp) if resp.status().as_u16() == 200 => {
                    match resp
                        .into_body()
                        .with_config()
                        .limit(SMALL_LIMIT)
                        .read_to_vec()
                    {
                        Ok(body) => return Ok(body),
                        Err(e) => format!("GET {url}: reading the body: {e}"),
                    }
                }
                Ok(resp) if resp.status().as_u16() == 404 => {
                    return Err(GetError::NotFound(url.to_string()))
                }
                Ok(resp) if resp.status().is_server_error() || resp.status().as_u16() == 429 => {
                    format!("GET {url}: server answered {}", resp.status())
                }
                Ok(resp) => {
                    return Err(GetError::Failed(format!(
                        "GET {url}: server answered {}",
                        resp.status()
                    )))
                }
                Err(e) => format!("GET {url}: {e}"),
            };
            if attempt >= self.retries {
                let tries = attempt + 1;
                return Err(GetError::Failed(format!(
                    "{failure} (gave up after {tries} attempts)"
                )));
            }
            let pause = self.backoff.delay(attempt);
            say!(
                "{failure}; retrying in {:.1} s ({}/{})",
                pause.as_secs_f64(),
                attempt + 1,
                self.retries
            );
            std::thread::sleep(pause);
            attempt += 1;
        }
    }

    /// POST a JSON body once, with an overall timeout. Retrying is the caller's choice: most
    /// events are superseded by the next one, the final one is retried until acknowledged.
    pub fn post_json(&self, url: &str, body: &[u8], timeout: Duration) -> Result<(), PostError> {
        let resp = self
            .agent
            .post(url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("Content-Type", "application/json")
            .send(body)
            .map_err(|e| PostError::Failed(format!("POST {url}: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let answer = format!("POST {url}: server answered {status}");
        if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            // The stack says why in a one-line body: that line is what the operator needs.
            let why = resp
                .into_body()
                .with_config()
                .limit(512)
                .read_to_string()
                .unwrap_or_default();
            return Err(PostError::Refused(format!("{answer}: {}", why.trim())));
        }
        Err(PostError::Failed(answer))
    }
}

/// Why a POST was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// A 4xx answer (not 408/429): the server understood and said no; the same request again
    /// gets the same answer.
    #[error("{0}")]
    Refused(String),
    /// No answer, or one worth retrying (5xx, 408, 429).
    #[error("{0}")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(700),
        };
        let d: Vec<u128> = (0..5).map(|i| b.delay(i).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 700, 700]);
        assert_eq!(b.delay(200), Duration::from_millis(700));
    }
}
