//! The login the cloud-init user-data declares, made by the installer so SSH accepts it from the
//! first boot's start: the user (with the distro's own `useradd`, exactly as cloud-init calls
//! it), its `authorized_keys` and its sudo rule. cloud-init's user module runs later, finds the
//! user in place ("already exists, skipping"), and merges the same keys and rule.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pxelab_contract::Login;

use crate::cmd;
use crate::error::{err, Context, Result};
use crate::seed::{write_atomic, write_owned};

pub const SUDOERS: &str = "etc/sudoers.d/90-pxelab-login";

/// A user as `/etc/passwd` in the new root lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Creates `login` in the new root unless it exists; writes its keys and sudo rule.
pub fn create(root: &Path, login: &Login) -> Result<User> {
    if lookup(root, &login.user)?.is_none() {
        cmd::chroot_run(
            root,
            "/usr/sbin/useradd",
            &[
                &login.user,
                "--comment",
                &login.gecos,
                "--shell",
                &login.shell,
                "-m",
            ],
        )?;
    }
    let user = lookup(root, &login.user)?.ok_or_else(|| {
        err(format!(
            "useradd {} left no entry in /etc/passwd",
            login.user
        ))
    })?;
    if !login.ssh_authorized_keys.is_empty() {
        let ssh = inside(root, &user.home).join(".ssh");
        fs::create_dir_all(&ssh).context(|| format!("creating {}", ssh.display()))?;
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))
            .and_then(|()| std::os::unix::fs::chown(&ssh, Some(user.uid), Some(user.gid)))
            .context(|| format!("setting the owner and mode of {}", ssh.display()))?;
        let keys: String = login
            .ssh_authorized_keys
            .iter()
            .map(|k| format!("{k}\n"))
            .collect();
        write_owned(
            &ssh.join("authorized_keys"),
            keys.as_bytes(),
            0o600,
            (user.uid, user.gid),
        )?;
    }
    if let Some(rule) = &login.sudo {
        let text = format!(
            "# Written by pxelab-installer: the user-data's sudo rule, in place before cloud-init\n\
             # runs (it writes the same rule to 90-cloud-init-users).\n\
             {} {rule}\n",
            login.user
        );
        write_atomic(&root.join(SUDOERS), text.as_bytes(), 0o440)?;
    }
    Ok(user)
}

/// `user`'s entry in `<root>/etc/passwd`.
pub fn lookup(root: &Path, user: &str) -> Result<Option<User>> {
    let path = root.join("etc/passwd");
    let text = fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() == 7 && f[0] == user).then_some(())?;
        Some(User {
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_string(),
        })
    }))
}

/// An absolute path of the new root, as seen from the installer.
fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_users_in_the_new_roots_passwd() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/bash\npxelab:x:1000:1001:pxelab lab user:/home/pxelab:/bin/bash\nbroken:x\n",
        )
        .unwrap();
        assert_eq!(
            lookup(t.path(), "pxelab").unwrap(),
            Some(User {
                uid: 1000,
                gid: 1001,
                home: "/home/pxelab".into()
            })
        );
        assert_eq!(lookup(t.path(), "pxe").unwrap(), None);
        assert_eq!(lookup(t.path(), "broken").unwrap(), None);
        assert_eq!(
            inside(t.path(), "/home/pxelab"),
            t.path().join("home/pxelab")
        );
    }
}
