//! `--store etcd://host:port[,…]`: the machines' definitions, states and boot tokens kept in an
//! etcd cluster that several stacks share, through etcd's v3 JSON gateway (plain HTTP, one
//! synchronous request per operation, keys and values in base64).
//!
//! Keys, under [`PREFIX`]: `vms/<name>.json` holds a definition (the bytes a `vms/<name>.json`
//! file would hold), `machines/<name>` a machine's [`Shared`] record. A change that must happen
//! once across stacks (a boot handed out with its token, entering `installed`, a reprovision) is
//! a transaction on the record's `mod_revision` ([`Etcd::swap`]): of two stacks that read the
//! same revision only one writes, the other reads again and decides again.
//!
//! Each endpoint is tried in turn, starting with the one that answered last, with a short
//! timeout: a dead member costs one refused connection, not the request.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use pxelab_contract::{Mac, VmState};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Where every key of the stack lives.
pub const PREFIX: &str = "/pxelab/";
/// One request to one member; an election after a member dies takes about a second.
const TIMEOUT: Duration = Duration::from_millis(1500);

/// etcd could not be asked (no member answered) or answered something unusable; one line.
#[derive(Debug)]
pub struct EtcdError(pub String);

impl std::fmt::Display for EtcdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `--store` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// The state directory and the VMs directory (the default).
    Files,
    /// etcd members, as `http://host:port`.
    Etcd(Vec<String>),
}

/// Parses `--store`: `files`, or `etcd://host:port[,host:port…]`. The error names the value and
/// the fix.
pub fn parse_store(s: &str) -> Result<StoreSpec, String> {
    let bad = |why: &str| {
        format!("invalid --store {s:?}: {why}; expected `files` or etcd://host:port[,host:port…] (the cluster's client URLs, e.g. etcd://10.0.0.11:2379,10.0.0.12:2379)")
    };
    if s == "files" {
        return Ok(StoreSpec::Files);
    }
    let Some(list) = s.strip_prefix("etcd://") else {
        return Err(bad("unknown scheme"));
    };
    let mut endpoints = Vec::new();
    for member in list.split(',') {
        let (host, port) = member
            .rsplit_once(':')
            .ok_or_else(|| bad(&format!("{member:?} has no port")))?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
        if !host_ok {
            return Err(bad(&format!("{member:?} is not host:port")));
        }
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(&format!("{member:?} has no valid port")))?;
        endpoints.push(format!("http://{member}"));
    }
    Ok(StoreSpec::Etcd(endpoints))
}

/// What every stack knows of a machine (its timeline stays with the stack that saw it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shared {
    pub mac: Mac,
    pub state: VmState,
    pub since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wipe: Option<String>,
}

/// A key's value and the revision it was last written at (0: no such key).
pub type Versioned = (Option<Vec<u8>>, i64);

pub struct Etcd {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// The endpoint that answered last.
    current: AtomicUsize,
}

impl Etcd {
    pub fn new(endpoints: Vec<String>) -> Etcd {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build();
        Etcd {
            endpoints,
            agent: ureq::Agent::new_with_config(config),
            current: AtomicUsize::new(0),
        }
    }

    /// The cluster's members, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// `POST /v3/kv/<api>` to the first member that answers.
    fn call(&self, api: &str, body: &Value) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let first = self.current.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..self.endpoints.len() {
            let at = (first + i) % self.endpoints.len();
            let url = format!("{}/v3/kv/{api}", self.endpoints[at]);
            match self.once(&url, &body) {
                Ok(v) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => failures.push(e),
            }
        }
        Err(EtcdError(format!(
            "no etcd member answered: {}",
            failures.join("; ")
        )))
    }

    fn once(&self, url: &str, body: &str) -> Result<Value, String> {
        let mut resp = self
            .agent
            .post(url)
            .header("Content-Type", "application/json")
            .send(body)
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("POST {url}: {e}"))?;
        if status != 200 {
            return Err(format!("POST {url}: {status} {}", text.trim()));
        }
        serde_json::from_str(&text).map_err(|e| format!("POST {url}: unreadable answer: {e}"))
    }

    /// The value of `key` and its `mod_revision`.
    pub fn get(&self, key: &str) -> Result<Versioned, EtcdError> {
        let answer = self.call("range", &json!({ "key": B64.encode(key) }))?;
        match answer["kvs"].as_array().and_then(|kvs| kvs.first()) {
            None => Ok((None, 0)),
            Some(kv) => Ok((Some(value(kv)?), revision(&kv["mod_revision"])?)),
        }
    }

    /// Every key under `prefix` (the prefix cut off) with its value, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let request =
            json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)) });
        let answer = self.call("range", &request)?;
        let mut found = Vec::new();
        for kv in answer["kvs"].as_array().into_iter().flatten() {
            let key = decode(&kv["key"])?;
            let key = String::from_utf8_lossy(&key);
            let name = key.strip_prefix(prefix).unwrap_or(&key).to_string();
            found.push((name, value(kv)?));
        }
        Ok(found)
    }

    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        self.call(
            "put",
            &json!({ "key": B64.encode(key), "value": B64.encode(value) }),
        )
        .map(|_| ())
    }

    /// Deletes `key`; whether it existed.
    pub fn delete(&self, key: &str) -> Result<bool, EtcdError> {
        let answer = self.call("deleterange", &json!({ "key": B64.encode(key) }))?;
        Ok(revision(&answer["deleted"])? > 0)
    }

    /// Writes `value` only if `key` is still at `mod_revision` (0: does not exist); whether it
    /// was written.
    pub fn swap(&self, key: &str, mod_revision: i64, value: &[u8]) -> Result<bool, EtcdError> {
        let key = B64.encode(key);
        let request = json!({
            "compare": [{
                "key": key,
                "result": "EQUAL",
                "target": "MOD",
                "mod_revision": mod_revision.to_string(),
            }],
            "success": [{ "request_put": { "key": key, "value": B64.encode(value) } }],
        });
        let answer = self.call("txn", &request)?;
        // proto3 JSON leaves out `false`.
        Ok(answer["succeeded"].as_bool().unwrap_or(false))
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn decode(v: &Value) -> Result<Vec<u8>, EtcdError> {
    B64.decode(v.as_str().unwrap_or_default())
        .map_err(|e| EtcdError(format!("etcd answered a value that is not base64: {e}")))
}

/// A key-value's value (absent when empty).
fn value(kv: &Value) -> Result<Vec<u8>, EtcdError> {
    if kv["value"].is_null() {
        return Ok(Vec::new());
    }
    decode(&kv["value"])
}

/// An int64 of the gateway: a string, or absent for 0.
fn revision(v: &Value) -> Result<i64, EtcdError> {
    match v {
        Value::Null => Ok(0),
        Value::String(s) => s.parse().map_err(|_| {
            EtcdError(format!(
                "etcd answered a revision that is not a number: {s:?}"
            ))
        }),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| EtcdError(format!("etcd answered a revision out of range: {n}"))),
        other => Err(EtcdError(format!(
            "etcd answered a revision that is not a number: {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_values_parse_or_say_what_is_expected() {
        assert_eq!(parse_store("files").unwrap(), StoreSpec::Files);
        assert_eq!(
            parse_store("etcd://10.0.0.11:2379,etcd-2.site:2379").unwrap(),
            StoreSpec::Etcd(vec![
                "http://10.0.0.11:2379".into(),
                "http://etcd-2.site:2379".into()
            ])
        );
        assert_eq!(
            parse_store("etcd://[fd00::1]:2379").unwrap(),
            StoreSpec::Etcd(vec!["http://[fd00::1]:2379".into()])
        );
        for bad in [
            "",
            "etcd",
            "http://10.0.0.1:2379",
            "etcd://",
            "etcd://10.0.0.1",
            "etcd://10.0.0.1:0",
            "etcd://10.0.0.1:2379,",
            "etcd://a b:1",
            "etcd://h:99999",
        ] {
            let e = parse_store(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("invalid --store {bad:?}")) && e.contains("etcd://"),
                "{e}"
            );
        }
    }

    #[test]
    fn prefixes_end_after_their_last_key_and_revisions_read_as_the_gateway_writes_them() {
        assert_eq!(prefix_end("/pxelab/vms/"), b"/pxelab/vms0");
        assert_eq!(revision(&Value::Null).unwrap(), 0);
        assert_eq!(revision(&json!("42")).unwrap(), 42);
        assert_eq!(revision(&json!(7)).unwrap(), 7);
        assert!(revision(&json!("x")).is_err());
        assert_eq!(value(&json!({"key": "YQ=="})).unwrap(), b"");
        assert_eq!(value(&json!({"value": "YWJj"})).unwrap(), b"abc");
        assert!(value(&json!({"value": "!"})).is_err());
    }

    #[test]
    fn a_cluster_without_members_that_answer_is_an_error_naming_each() {
        // Port 1 on loopback refuses at once.
        let etcd = Etcd::new(vec![
            "http://127.0.0.1:1".into(),
            "http://127.0.0.1:2".into(),
        ]);
        let e = etcd.get("/pxelab/machines/x").unwrap_err().0;
        assert!(
            e.starts_with("no etcd member answered") && e.contains(":1/") && e.contains(":2/"),
            "{e}"
        );
    }
}
