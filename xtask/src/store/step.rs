//! The action cache: a build step is described by name, version, input digests and parameters
//! ([`Step`]); their sha256 is the key of a record (`actions/ab/<key>.json`) naming the step's
//! output blobs. A hit returns the recorded outputs without running anything.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{read_dir_sorted, write_atomic, Sha256Hex, Store};

impl Store {
    /// Start describing a build step for the action cache (see [`Step`]).
    pub fn step(&self, name: &str, version: u32) -> Step<'_> {
        Step {
            store: self,
            name: name.to_string(),
            version,
            inputs: BTreeMap::new(),
            params: BTreeMap::new(),
        }
    }

    /// Every action record in the store.
    pub fn list_actions(&self) -> Result<Vec<(PathBuf, ActionRecord)>> {
        let mut out = Vec::new();
        for shard in read_dir_sorted(&self.root.join("actions"))? {
            for f in read_dir_sorted(&shard)? {
                if f.extension().is_some_and(|e| e == "json") {
                    let text = fs::read_to_string(&f)?;
                    match serde_json::from_str(&text) {
                        Ok(rec) => out.push((f, rec)),
                        Err(e) => eprintln!(
                            "warning: ignoring unreadable action record {}: {e}",
                            f.display()
                        ),
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A build step being described: name, version, inputs and parameters form the cache key.
pub struct Step<'s> {
    store: &'s Store,
    name: String,
    version: u32,
    inputs: BTreeMap<String, String>,
    params: BTreeMap<String, String>,
}

/// One output file of a step, stored as a blob.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputFile {
    /// Path relative to the step's output directory, `/`-separated.
    pub name: String,
    pub sha256: Sha256Hex,
    pub size: u64,
    /// Unix mode bits of the file the step wrote (e.g. 0o755 for executables).
    pub mode: u32,
}

/// The action cache's record of one step run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionRecord {
    pub step: String,
    pub version: u32,
    pub inputs: BTreeMap<String, String>,
    pub params: BTreeMap<String, String>,
    pub outputs: Vec<OutputFile>,
}

/// The result of [`Step::run`].
#[derive(Debug)]
pub struct StepOutputs {
    /// True if the outputs came from the action cache and the step did not run.
    pub cached: bool,
    /// The action cache key (hex).
    pub key: String,
    /// Sorted by name. `path` points into the store (read-only): use [`Store::materialize`] or
    /// [`StepOutputs::materialize_all`] to get writable copies.
    pub files: Vec<StepFile>,
}

#[derive(Debug, Clone)]
pub struct StepFile {
    pub name: String,
    pub digest: Sha256Hex,
    pub size: u64,
    pub mode: u32,
    pub path: PathBuf,
}

impl StepOutputs {
    /// The output called `name`, or an error naming the outputs that exist.
    pub fn get(&self, name: &str) -> Result<&StepFile> {
        self.files.iter().find(|f| f.name == name).with_context(|| {
            let names: Vec<_> = self.files.iter().map(|f| f.name.as_str()).collect();
            format!(
                "step output {name:?} does not exist (outputs: {})",
                names.join(", ")
            )
        })
    }

    /// Copy every output under `dir` (keeping relative names and modes).
    pub fn materialize_all(&self, store: &Store, dir: &Path) -> Result<()> {
        for f in &self.files {
            let dest = dir.join(&f.name);
            store.materialize(&f.digest, &dest)?;
            fs::set_permissions(&dest, fs::Permissions::from_mode(f.mode & 0o777))?;
        }
        Ok(())
    }
}

impl<'s> Step<'s> {
    /// An input by digest (e.g. a locked file's sha256 or another step's output digest).
    pub fn input(mut self, name: &str, digest: &str) -> Self {
        self.inputs.insert(name.to_string(), digest.to_string());
        self
    }

    /// A parameter that changes the output.
    pub fn param(mut self, name: &str, value: impl ToString) -> Self {
        self.params.insert(name.to_string(), value.to_string());
        self
    }

    /// The action cache key: sha256 over a canonical JSON of name, version, inputs, params.
    pub fn key(&self) -> String {
        let canonical = serde_json::json!({
            "step": self.name, "version": self.version, "inputs": self.inputs, "params": self.params,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.store
            .root
            .join("actions")
            .join(&key[..2])
            .join(format!("{key}.json"))
    }

    /// On a hit (record present and every output blob good), return the recorded outputs without
    /// running anything. On a miss, run `build` with a fresh empty directory, store every regular
    /// file it leaves there as a blob, and record them. Two runs of the same step at once: the
    /// second waits and then hits.
    pub fn run(self, build: impl FnOnce(&Path) -> Result<()>) -> Result<StepOutputs> {
        let key = self.key();
        let _lock = self
            .store
            .lock_item(&format!("step-{key}"), &format!("step {}", self.name))?;
        let record_path = self.record_path(&key);
        if let Some(outputs) = self.lookup(&key, &record_path)? {
            return Ok(outputs);
        }
        let scratch = tempfile::Builder::new()
            .prefix(&format!("step-{}-", self.name))
            .tempdir_in(self.store.tmp_dir())?;
        let out_dir = scratch.path().join("out");
        fs::create_dir(&out_dir)?;
        build(&out_dir)
            .with_context(|| format!("step {} (version {}) failed", self.name, self.version))?;
        let mut files = Vec::new();
        collect_files(&out_dir, &out_dir, &mut files)?;
        files.sort();
        if files.is_empty() {
            bail!("step {} produced no output files", self.name);
        }
        let mut outputs = Vec::new();
        for rel in files {
            let path = out_dir.join(&rel);
            let meta = fs::metadata(&path)?;
            let digest = self.store.insert_file(&path, None)?;
            outputs.push(OutputFile {
                name: rel,
                sha256: digest,
                size: meta.len(),
                mode: meta.mode() & 0o7777,
            });
        }
        let record = ActionRecord {
            step: self.name.clone(),
            version: self.version,
            inputs: self.inputs.clone(),
            params: self.params.clone(),
            outputs,
        };
        write_atomic(
            &record_path,
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        Ok(self.outputs(key, &record, false))
    }

    fn lookup(&self, key: &str, record_path: &Path) -> Result<Option<StepOutputs>> {
        let Ok(text) = fs::read_to_string(record_path) else {
            return Ok(None);
        };
        let Ok(record) = serde_json::from_str::<ActionRecord>(&text) else {
            eprintln!(
                "warning: action record {} is unreadable; rebuilding step {}",
                record_path.display(),
                self.name
            );
            return Ok(None);
        };
        for o in &record.outputs {
            if !self.store.has(&o.sha256)? {
                eprintln!(
                    "step {}: output {} is missing from the store; rebuilding",
                    self.name, o.name
                );
                return Ok(None);
            }
        }
        Ok(Some(self.outputs(key.to_string(), &record, true)))
    }

    fn outputs(&self, key: String, record: &ActionRecord, cached: bool) -> StepOutputs {
        let files = record
            .outputs
            .iter()
            .map(|o| StepFile {
                name: o.name.clone(),
                digest: o.sha256.clone(),
                size: o.size,
                mode: o.mode,
                path: self.store.blob_path(&o.sha256),
            })
            .collect();
        StepOutputs { cached, key, files }
    }
}

fn collect_files(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for p in read_dir_sorted(dir)? {
        let meta = fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            collect_files(base, &p, out)?;
        } else if meta.is_file() {
            let rel = p.strip_prefix(base).expect("walked under base");
            let rel = rel
                .to_str()
                .with_context(|| format!("output name {} is not UTF-8", rel.display()))?;
            out.push(rel.to_string());
        } else {
            bail!(
                "step output {} is not a regular file (symlinks and devices are not stored)",
                p.display()
            );
        }
    }
    Ok(())
}
