//! The installer's inputs: its command line (`key=value` words, as /init passes them from the
//! kernel command line) and the [`InstallerConfig`] fetched from the boot handler.

use std::path::PathBuf;
use std::time::Duration;

use pxelab_contract::{InstallerConfig, Login};

use crate::error::{err, Result};
use crate::http::{Backoff, Http};

pub const USAGE: &str = "usage: pxelab-installer config_url=http://SERVER/config/MAC \
[pxelab.retries=N] [pxelab.backoff_ms=MS] [pxelab.target=/mnt/target]";

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub config_url: String,
    /// Retries after the first attempt for every download and resume.
    pub retries: u32,
    /// First pause between retries (doubles up to 8 s).
    pub backoff: Duration,
    /// Where the new root is mounted while installing.
    pub target: PathBuf,
}

impl Args {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            first: self.backoff,
            max: Backoff::DEFAULT.max.max(self.backoff),
        }
    }
}

/// Parses `key=value` words. Unknown keys are errors, so a typo never goes unnoticed.
pub fn parse_args(words: impl IntoIterator<Item = String>) -> Result<Args> {
    let mut config_url = None;
    let mut args = Args {
        config_url: String::new(),
        retries: 8,
        backoff: Backoff::DEFAULT.first,
        target: PathBuf::from("/mnt/target"),
    };
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(err(format!("unexpected argument {word:?}; {USAGE}")));
        };
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| err(format!("{key}={value:?} is not a whole number; {USAGE}")))
        };
        match key {
            "config_url" => config_url = Some(value.to_string()),
            "pxelab.retries" => args.retries = number()?.min(100) as u32,
            "pxelab.backoff_ms" => args.backoff = Duration::from_millis(number()?),
            "pxelab.target" if value.starts_with('/') && value.len() > 1 => {
                args.target = PathBuf::from(value)
            }
            "pxelab.target" => {
                return Err(err(format!(
                    "pxelab.target={value:?} must be an absolute directory path"
                )))
            }
            _ => return Err(err(format!("unknown argument {key:?}; {USAGE}"))),
        }
    }
    args.config_url = config_url.ok_or_else(|| {
        err(format!(
            "no config_url= given (the boot handler's iPXE script puts it on the kernel command line); {USAGE}"
        ))
    })?;
    check_http_url("config_url", &args.config_url)?;
    Ok(args)
}

/// The installer speaks plain HTTP only (see `http.rs`); say so up front rather than at the
/// first request.
fn check_http_url(what: &str, url: &str) -> Result<()> {
    if url.starts_with("http://") && url.len() > "http://".len() {
        Ok(())
    } else {
        Err(err(format!(
            "{what} {url:?} is not an http:// URL (the installer speaks plain HTTP only)"
        )))
    }
}

/// Fetches and checks the config.
pub fn fetch(http: &Http, url: &str) -> Result<InstallerConfig> {
    let body = http
        .get_small(url)
        .map_err(|e| err(format!("fetching the installer config: {e}")))?;
    parse(&body, url)
}

pub fn parse(body: &[u8], url: &str) -> Result<InstallerConfig> {
    let config: InstallerConfig = serde_json::from_slice(body).map_err(|e| {
        err(format!(
            "the config at {url} is not an installer config: {e}"
        ))
    })?;
    check_http_url("rootfs.url", &config.rootfs.url)?;
    check_http_url("cloud_init_url", &config.cloud_init_url)?;
    check_http_url("events_url", &config.events_url)?;
    let sha = &config.rootfs.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(err(format!(
            "rootfs.sha256 {sha:?} in {url} is not 64 hex digits"
        )));
    }
    if config.rootfs.size == 0 {
        return Err(err(format!("rootfs.size in {url} is 0")));
    }
    if !config.cloud_init_url.ends_with('/') {
        return Err(err(format!(
            "cloud_init_url {:?} in {url} must end with '/'",
            config.cloud_init_url
        )));
    }
    if let Some(disk) = &config.disk {
        if !disk.starts_with("/dev/") {
            return Err(err(format!(
                "disk {disk:?} in {url} is not a device path such as /dev/vda"
            )));
        }
    }
    if let Some(login) = &config.login {
        check_login(login).map_err(|what| err(format!("login in {url}: {what}")))?;
    }
    let hostname_ok = !config.hostname.is_empty()
        && config.hostname.len() <= 253
        && config
            .hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !hostname_ok {
        return Err(err(format!(
            "hostname {:?} in {url} is not a valid host name",
            config.hostname
        )));
    }
    Ok(config)
}

/// The login's fields end up in `/etc/passwd`, `authorized_keys` and sudoers: one line each,
/// no field separators.
fn check_login(login: &Login) -> Result<(), String> {
    let u = login.user.as_bytes();
    let user_ok = !u.is_empty()
        && u.len() <= 32
        && (u[0].is_ascii_lowercase() || u[0] == b'_')
        && u.iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(b));
    if !user_ok {
        return Err(format!("user {:?} is not a valid user name", login.user));
    }
    let line = |s: &str| !s.chars().any(char::is_control);
    if !line(&login.gecos) || login.gecos.contains(':') {
        return Err(format!(
            "gecos {:?} must be one line without ':'",
            login.gecos
        ));
    }
    if !login.shell.starts_with('/') || !line(&login.shell) || login.shell.contains([':', ' ']) {
        return Err(format!("shell {:?} is not an absolute path", login.shell));
    }
    if let Some(rule) = login.sudo.as_deref().filter(|r| !line(r)) {
        return Err(format!("sudo rule {rule:?} must be one line"));
    }
    if let Some(key) = login.ssh_authorized_keys.iter().find(|k| !line(k)) {
        return Err(format!("SSH key {key:?} must be one line"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn parses_the_words_init_passes() {
        let a = parse_args(words(
            "config_url=http://10.0.0.1:8080/config/52-54-00-00-00-01 pxelab.retries=2",
        ))
        .unwrap();
        assert_eq!(
            a.config_url,
            "http://10.0.0.1:8080/config/52-54-00-00-00-01"
        );
        assert_eq!(a.retries, 2);
        assert_eq!(a.target, PathBuf::from("/mnt/target"));
    }

    #[test]
    fn rejects_missing_or_bad_input_with_a_hint() {
        assert!(parse_args(words(""))
            .unwrap_err()
            .0
            .contains("no config_url="));
        assert!(parse_args(words("config_url=https://x/"))
            .unwrap_err()
            .0
            .contains("plain HTTP"));
        assert!(
            parse_args(words("config_url=http://x/ pxelab.retries=many"))
                .unwrap_err()
                .0
                .contains("whole number")
        );
        assert!(parse_args(words("config_url=http://x/ bogus=1"))
            .unwrap_err()
            .0
            .contains("unknown argument"));
        assert!(parse_args(words("config_url=http://x/ pxelab.target=rel")).is_err());
    }

    const GOOD: &str = r#"{"name":"t1","mac":"52:54:00:00:00:01","hostname":"t1","distro":"debian-12",
        "rootfs":{"url":"http://h/r.tar.zst","sha256":"0000000000000000000000000000000000000000000000000000000000000000","size":5},
        "cloud_init_url":"http://h/cloud-init/t1/","events_url":"http://h/events/52-54-00-00-00-01","reboot":true}"#;

    #[test]
    fn reads_the_boot_handlers_reply_with_its_extra_keys() {
        let config = parse(GOOD.as_bytes(), "u").unwrap();
        let reply = pxelab_contract::ConfigReply {
            config: config.clone(),
            arch: pxelab_contract::Arch::X86_64,
            rootfs_url: config.rootfs.url.clone(),
            kernel_url: "http://h/vmlinuz".into(),
            kmods_url: "http://h/modules.cpio.zst".into(),
            reboot_on_success: true,
        };
        let body = serde_json::to_vec(&reply).unwrap();
        assert_eq!(parse(&body, "u").unwrap(), config);
    }

    fn login(user: &str) -> String {
        format!(
            r#""login":{{"user":"{user}","gecos":"lab","shell":"/bin/bash","sudo":"ALL=(ALL) NOPASSWD:ALL","ssh_authorized_keys":["ssh-ed25519 AAAA x"]}}"#
        )
    }

    #[test]
    fn accepts_a_good_config_and_rejects_bad_fields() {
        let c = parse(GOOD.as_bytes(), "u").unwrap();
        assert_eq!((c.disk, c.direct_start, c.login), (None, false, None));
        let with_login = GOOD.replace(
            "\"reboot\":true",
            &format!("\"reboot\":true,\"direct_start\":true,{}", login("pxelab")),
        );
        let c = parse(with_login.as_bytes(), "u").unwrap();
        assert!(c.direct_start);
        // From a stack built before the switch root.
        let older = with_login.replace("direct_start", "kexec");
        assert!(parse(older.as_bytes(), "u").unwrap().direct_start);
        assert_eq!(c.login.unwrap().ssh_authorized_keys, ["ssh-ed25519 AAAA x"]);
        let bad = [
            GOOD.replace("\"size\":5", "\"size\":0"),
            GOOD.replace(
                "0000000000000000000000000000000000000000000000000000000000000000",
                "abc",
            ),
            GOOD.replace("cloud-init/t1/", "cloud-init/t1"),
            GOOD.replace("http://h/r.tar.zst", "https://h/r.tar.zst"),
            GOOD.replace("\"hostname\":\"t1\"", "\"hostname\":\"a b\""),
            GOOD.replace("\"reboot\":true", "\"reboot\":true,\"disk\":\"vda\""),
            GOOD.replace(
                "\"reboot\":true",
                &format!("\"reboot\":true,{}", login("Root")),
            ),
            GOOD.replace(
                "\"reboot\":true",
                &format!("\"reboot\":true,{}", login("a"))
                    .replace("NOPASSWD:ALL", "ALL\\nroot ALL"),
            ),
        ];
        for b in bad {
            assert!(parse(b.as_bytes(), "u").is_err(), "{b}");
        }
    }
}
