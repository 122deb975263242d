//! Never wiping a disk that holds something unless the operator asked: what the start of a disk
//! carries (a partition table, a filesystem or volume signature, a pxelab install id), and the
//! install id the installer leaves on the disk it installs.
//!
//! The install id is a small JSON line at [`ID_OFFSET`], in the gap GPT leaves between its
//! partition entries and the first partition (at 1 MiB): no partition or filesystem owns those
//! bytes, and they are read back together with the signatures, before anything is written. It is
//! written right after partitioning and again, marked finished, after the final unmount: a disk
//! left by an unfinished install of the same machine (a failed download, a power cut) is its
//! own to retry, a finished one needs the operator's word.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::disk::MIB;
use crate::error::{err, Context, Result};

/// Where the install id goes: past the GPT entries of either sector size (they end by 24 KiB).
const ID_OFFSET: u64 = 512 << 10;
/// The install id's first bytes.
const ID_MAGIC: &[u8] = b"pxelab-install ";
/// Room for the install id (one line, zero padded).
const ID_SIZE: usize = 4096;
/// How much of the disk's start is read: every signature below and the install id lie in it.
const HEAD: usize = MIB as usize;

/// What the installer writes on the disk it installs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallId {
    pub vm: String,
    pub mac: String,
    /// When the install started, UTC (`2026-12-03T06:14:36Z`).
    pub at: String,
    /// 128 random bits, hex: tells two installs of the same VM apart.
    pub id: String,
    /// When the install finished (its disk complete), UTC; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
}

/// What the start of a disk holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    /// What was recognised (`GPT partition table`, `ext4 filesystem`, …), or the first non-zero
    /// offset when nothing was.
    pub what: Vec<String>,
    pub install: Option<InstallId>,
}

impl Found {
    /// One phrase for the operator: `a GPT partition table (pxelab install of t1, …)`.
    pub fn describe(&self) -> String {
        let mut s = self.what.join(", ");
        if let Some(id) = &self.install {
            let state = match &id.finished {
                Some(at) => format!("finished {at}"),
                None => "unfinished".to_string(),
            };
            s.push_str(&format!(
                " (pxelab install of {} ({}) started {}, {state}, id {})",
                id.vm, id.mac, id.at, id.id
            ));
        }
        s
    }
}

/// Reads the start of `disk`: `None` when it is all zeros (a blank disk).
pub fn inspect(disk: &Path) -> Result<Option<Found>> {
    let mut head = Vec::with_capacity(HEAD);
    File::open(disk)
        .and_then(|f| f.take(HEAD as u64).read_to_end(&mut head))
        .context(|| format!("reading the start of {}", disk.display()))?;
    Ok(examine(&head))
}

/// The signatures in `head` (a disk's first bytes), `None` when they are all zeros.
fn examine(head: &[u8]) -> Option<Found> {
    let first_used = head.iter().position(|b| *b != 0)?;
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    let mut what = Vec::new();
    if at(512, b"EFI PART") || at(4096, b"EFI PART") {
        what.push("a GPT partition table".to_string());
    } else if at(510, &[0x55, 0xaa]) {
        what.push("an MBR boot sector or partition table".to_string());
    }
    let filesystems: [(usize, &[u8], &str); 12] = [
        (1080, &[0x53, 0xef], "an ext2/3/4 filesystem"),
        (0, b"XFSB", "an XFS filesystem"),
        (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
        (0x36, b"FAT1", "a FAT filesystem"),
        (0x52, b"FAT32", "a FAT filesystem"),
        (512, b"LABELONE", "an LVM physical volume"),
        (0, b"LUKS\xba\xbe", "a LUKS volume"),
        (4086, b"SWAPSPACE2", "a swap area"),
        (0x8001, b"CD001", "an ISO 9660 filesystem"),
        (0, &[0xfc, 0x4e, 0x2b, 0xa9], "a Linux RAID member"),
        (4096, &[0xfc, 0x4e, 0x2b, 0xa9], "a Linux RAID member"),
        (3, b"NTFS    ", "an NTFS filesystem"),
    ];
    for (offset, magic, name) in filesystems {
        if at(offset, magic) && !what.iter().any(|w| w == name) {
            what.push(name.to_string());
        }
    }
    let install = read_id(head);
    if what.is_empty() && install.is_none() {
        what.push(format!("data at byte {first_used}"));
    }
    Some(Found { what, install })
}

fn read_id(head: &[u8]) -> Option<InstallId> {
    let start = usize::try_from(ID_OFFSET).ok()?;
    let slot = head.get(start..start + ID_SIZE)?;
    let json = slot.strip_prefix(ID_MAGIC)?;
    let end = json.iter().position(|b| *b == b'\n')?;
    serde_json::from_slice(&json[..end]).ok()
}

/// Refuses `disk` when it holds anything, unless the config carries the operator's reprovision
/// nonce (`wipe`) or it holds an unfinished install of this machine (`mac`). Returns what will
/// be wiped, for the log.
pub fn check(disk: &Path, vm: &str, mac: &str, wipe: Option<&str>) -> Result<Option<String>> {
    let Some(found) = inspect(disk)? else {
        return Ok(None);
    };
    if wipe.is_some() {
        return Ok(Some(format!(
            "wiping {} as reprovisioned",
            found.describe()
        )));
    }
    if found
        .install
        .as_ref()
        .is_some_and(|id| id.mac == mac && id.finished.is_none())
    {
        return Ok(Some(format!("retrying over {}", found.describe())));
    }
    Err(err(format!(
        "{} is not blank: it carries {}; refusing to wipe it without the operator's word: run `cargo xtask lab vm reprovision {vm}` (or clear the disk), then boot {vm} again",
        disk.display(),
        found.describe()
    )))
}

/// Writes `id` on `disk` (after partitioning, before any filesystem), durably.
pub fn write_id(disk: &Path, id: &InstallId) -> Result<()> {
    let json = serde_json::to_vec(id).context(|| "encoding the install id")?;
    let mut slot = Vec::with_capacity(ID_SIZE);
    slot.extend_from_slice(ID_MAGIC);
    slot.extend_from_slice(&json);
    slot.push(b'\n');
    if slot.len() > ID_SIZE {
        return Err(err(format!(
            "the install id is {} bytes, more than its {ID_SIZE}",
            slot.len()
        )));
    }
    slot.resize(ID_SIZE, 0);
    let file = OpenOptions::new()
        .write(true)
        .open(disk)
        .context(|| format!("opening {} to write the install id", disk.display()))?;
    file.write_all_at(&slot, ID_OFFSET)
        .and_then(|()| file.sync_data())
        .context(|| format!("writing the install id to {}", disk.display()))
}

/// `seconds` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's civil_from_days).
pub fn utc(seconds: u64) -> String {
    let days = (seconds / 86400) as i64;
    let rest = seconds % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> Vec<u8> {
        vec![0u8; HEAD]
    }

    #[test]
    fn a_blank_disk_carries_nothing() {
        assert_eq!(examine(&blank()), None);
        assert_eq!(examine(&[]), None, "an empty read is blank too");
    }

    #[test]
    fn a_gpt_disk_is_recognised() {
        let mut head = blank();
        head[510..512].copy_from_slice(&[0x55, 0xaa]);
        head[512..520].copy_from_slice(b"EFI PART");
        let found = examine(&head).unwrap();
        assert_eq!(found.what, ["a GPT partition table"]);
        assert_eq!(found.install, None);
    }

    #[test]
    fn an_ext4_filesystem_on_the_whole_disk_is_recognised() {
        let mut head = blank();
        head[1080..1082].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(examine(&head).unwrap().what, ["an ext2/3/4 filesystem"]);
    }

    #[test]
    fn unknown_data_is_not_blank() {
        let mut head = blank();
        head[70_000] = 1;
        assert_eq!(examine(&head).unwrap().what, ["data at byte 70000"]);
    }

    #[test]
    fn the_install_id_is_read_back_and_named_in_the_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, blank()).unwrap();
        assert_eq!(
            check(&disk, "t1", "52:54:00:12:34:56", None).unwrap(),
            None,
            "blank: installs"
        );

        let mut head = blank();
        head[512..520].copy_from_slice(b"EFI PART");
        std::fs::write(&disk, head).unwrap();
        let id = InstallId {
            vm: "t1".into(),
            mac: "52:54:00:12:34:56".into(),
            at: utc(1_796_278_476),
            id: "0123456789abcdef0123456789abcdef".into(),
            finished: None,
        };
        write_id(&disk, &id).unwrap();
        assert_eq!(inspect(&disk).unwrap().unwrap().install, Some(id.clone()));
        let note = check(&disk, "t1", &id.mac, None).unwrap().unwrap();
        assert!(
            note.starts_with("retrying over a GPT partition table (pxelab install of t1"),
            "an unfinished install of the same machine is retried: {note}"
        );
        assert!(
            check(&disk, "t2", "52:54:00:12:34:99", None).is_err(),
            "another machine's unfinished install is not"
        );

        let done = InstallId {
            finished: Some(utc(1_796_278_536)),
            ..id
        };
        write_id(&disk, &done).unwrap();
        let e = check(&disk, "t1", &done.mac, None).unwrap_err().0;
        assert_eq!(
            e,
            format!(
                "{} is not blank: it carries a GPT partition table (pxelab install of t1 (52:54:00:12:34:56) started 2026-12-03T06:14:36Z, finished 2026-12-03T06:15:36Z, id 0123456789abcdef0123456789abcdef); refusing to wipe it without the operator's word: run `cargo xtask lab vm reprovision t1` (or clear the disk), then boot t1 again",
                disk.display()
            )
        );
        let note = check(&disk, "t1", &done.mac, Some("nonce"))
            .unwrap()
            .unwrap();
        assert!(
            note.starts_with("wiping a GPT partition table (pxelab install of t1"),
            "{note}"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_278_476), "2026-12-03T06:14:36Z");
    }
}
