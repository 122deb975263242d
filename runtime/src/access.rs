//! Who may fetch and change what a machine has: the per-boot token it is handed with its
//! installer or diskless boot, and the address it is known by (its reserved IP, else the address
//! of its current DHCP lease).
//!
//! A token is 128 random bits from the kernel, minted by `/ipxe` for each network boot that
//! reports back (an install, a diskless boot) and kept with the machine's state. The URLs the
//! boot is given carry it (`config_url=…/config/<mac>?token=…`, `events_url`, the diskless
//! `pxelab.events=`), and `/config` and `/events` over the network accept only the current one:
//! a host that was never handed the boot cannot read a machine's install config nor change its
//! state. Once the machine is installed its token stays readable there (the installed system
//! runs on the installer's kernel, command line included), so from then on it opens no config
//! and reports only `cloud-init-done`; a reprovision and the next boot's new token end it. `/ipxe` hands a token only to the machine's own address (unless the stack runs with
//! `--no-ip-check`), so asking for one does not work from elsewhere either.
//!
//! proxyDHCP (`--dhcp proxy`): the site's server leases the addresses and we see no lease, so a
//! machine without `ip` is known by the address its last `GET /ipxe` came from ([`Leases`] holds
//! it); `/ipxe` itself then answers any address, as a DHCP server answers whoever claims a MAC.
//! Its cloud-init documents, `/config` and `/events` must come from that address (the last two
//! also with the token; a restarted stack knows the address again at the next `/ipxe`).
//!
//! The enrollment API (`/api/…`) is the operator's: over the network it requires the operator
//! token of `--api-token-file` as `Authorization: Bearer <token>`.

use std::{
    collections::HashMap,
    io::{self, Read},
    net::Ipv4Addr,
    sync::Mutex,
};

use pxelab_contract::{Mac, VmDefinition};

/// Hex digits of a token (128 bits).
pub const TOKEN_LEN: usize = 32;

/// A new token: 32 lowercase hex digits of kernel randomness. The kernel's bytes are fetched a
/// few tokens at a time per thread (a `getrandom` per boot was 3% of a boot storm's CPU); each
/// byte serves one token only and is zeroed once used.
pub fn mint() -> io::Result<String> {
    const BATCH: usize = 64 * TOKEN_LEN / 2;
    thread_local! {
        /// Unused random bytes, and where they start.
        static POOL: std::cell::RefCell<([u8; BATCH], usize)> =
            const { std::cell::RefCell::new(([0; BATCH], BATCH)) };
    }
    POOL.with(|pool| {
        let (bytes, used) = &mut *pool.borrow_mut();
        if *used == BATCH {
            fill_random(bytes)?;
            *used = 0;
        }
        let token = &mut bytes[*used..*used + TOKEN_LEN / 2];
        let hex = hex::encode(&*token);
        token.fill(0);
        *used += TOKEN_LEN / 2;
        Ok(hex)
    })
}

fn fill_random(bytes: &mut [u8]) -> io::Result<()> {
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // A kernel without getrandom(2) (older than 3.17): the same pool through the device.
        std::fs::File::open("/dev/urandom")?.read_exact(bytes)?;
    }
    Ok(())
}

/// Whether `given` is the current token `expected`, compared in constant time.
pub fn token_matches(expected: Option<&str>, given: &str) -> bool {
    let Some(expected) = expected else {
        return false;
    };
    expected.len() == given.len()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Whether an `Authorization` header value is `Bearer <expected>` (compared in constant time).
pub fn bearer_matches(header: Option<&str>, expected: &str) -> bool {
    let given = header
        .and_then(|h| h.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    token_matches(Some(expected), given)
}

/// The operator token in `path` (surrounding whitespace dropped). Refused, in one line naming
/// the file and the fix, when the file is unreadable, readable by every user, empty, or the
/// token has characters a header cannot carry unchanged.
pub fn read_operator_token(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let cannot = |e: io::Error| format!("cannot read --api-token-file {shown}: {e}");
    let mode = std::fs::metadata(path)
        .map_err(cannot)?
        .permissions()
        .mode();
    if mode & 0o004 != 0 {
        return Err(format!(
            "--api-token-file {shown} is readable by every user (mode {:o}): run `chmod o-rwx {shown}`",
            mode & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(cannot)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "--api-token-file {shown} is empty: write the operator token into it (e.g. `openssl rand -hex 32 > {shown}`)"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "--api-token-file {shown}: the token has spaces or non-ASCII characters; use printable ASCII only (e.g. `openssl rand -hex 32`)"
        ));
    }
    Ok(token.to_string())
}

/// The addresses dnsmasq last leased, by MAC (learned from its log and its lease file), or in
/// proxy mode the addresses the machines' last `/ipxe` came from.
#[derive(Default)]
pub struct Leases {
    by_mac: Mutex<HashMap<Mac, Ipv4Addr>>,
}

impl Leases {
    pub fn set(&self, mac: Mac, ip: Ipv4Addr) {
        self.by_mac
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mac, ip);
    }

    pub fn get(&self, mac: Mac) -> Option<Ipv4Addr> {
        self.by_mac
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&mac)
            .copied()
    }
}

/// The address requests for `vm`'s own documents must come from: its reservation, else its
/// current lease; `None` when neither is known.
pub fn machine_address(vm: &VmDefinition, leases: &Leases) -> Option<Ipv4Addr> {
    vm.ip.or_else(|| leases.get(vm.mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_compared_exactly() {
        let (a, b) = (mint().unwrap(), mint().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), TOKEN_LEN);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert!(token_matches(Some(&a), &a));
        assert!(!token_matches(Some(&a), &b));
        assert!(!token_matches(Some(&a), &a[..31]));
        assert!(!token_matches(Some(&a), ""));
        assert!(!token_matches(None, &a));
    }

    #[test]
    fn bearer_headers_match_only_the_operator_token() {
        assert!(bearer_matches(Some("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(Some("bearer  s3cret "), "s3cret"));
        for wrong in [
            None,
            Some(""),
            Some("s3cret"),
            Some("Basic s3cret"),
            Some("Bearer s3cre"),
            Some("Bearer "),
        ] {
            assert!(!bearer_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }

    #[test]
    fn operator_token_files_must_be_private_and_hold_a_token() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("s3cret\n", 0o600);
        assert_eq!(read_operator_token(&path).unwrap(), "s3cret");
        write("s3cret\n", 0o644);
        let e = read_operator_token(&path).unwrap_err();
        assert!(
            e.contains("readable by every user") && e.contains("chmod"),
            "{e}"
        );
        write(" \n", 0o600);
        assert!(read_operator_token(&path).unwrap_err().contains("is empty"));
        write("two words", 0o600);
        assert!(read_operator_token(&path).unwrap_err().contains("spaces"));
        let e = read_operator_token(&dir.path().join("missing")).unwrap_err();
        assert!(e.starts_with("cannot read --api-token-file"), "{e}");
    }
}
