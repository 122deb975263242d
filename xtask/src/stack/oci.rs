//! A container image written directly, with no daemon: an OCI image layout archive and a
//! `docker load` archive holding the same config and layers.
//!
//! Every byte is a function of the inputs: JSON goes through [`canonical_json`] (keys sorted,
//! whatever map type serde_json was built with), tar headers carry one mtime and owner 0:0
//! (see `archive::Archive::to_tar`), and gzip has no name and mtime 0. The image digest is
//! therefore the same for two builds from empty stores.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::archive::{Archive, Record, Source};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Serialize with object keys sorted at every level. serde_json keeps insertion order when
/// any crate in the build enables its `preserve_order` feature; sorting here makes the bytes
/// independent of that.
pub fn canonical_json(v: &Value) -> Vec<u8> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sorted(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_vec(&sorted(v)).expect("a serde_json::Value always serializes")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// gzip with no file name and mtime 0, so equal input gives equal bytes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::new(6));
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// `1700000000` → `"2023-11-14T22:13:20Z"` (RFC 3339, UTC): the `created` field.
pub fn rfc3339(epoch: u64) -> String {
    let t = crate::util::utc(epoch);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// What the image runs and exposes (the `config` object of the image configuration).
#[derive(Clone, Debug, Default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// e.g. `67/udp`.
    pub exposed_ports: Vec<String>,
    pub volumes: Vec<String>,
    pub working_dir: String,
    pub stop_signal: String,
    pub labels: BTreeMap<String, String>,
}

/// One layer: its uncompressed tar and a line for the image history.
pub struct LayerInput {
    pub tar: Vec<u8>,
    pub created_by: String,
}

/// A finished layer.
pub struct Layer {
    pub tar: Vec<u8>,
    pub gzip: Vec<u8>,
    /// sha256 of the uncompressed tar (the config's `diff_ids`).
    pub diff_id: String,
    /// sha256 of the gzip blob (the manifest's layer digest).
    pub digest: String,
}

/// The image, ready to be written in either archive form.
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    /// sha256 of the manifest: the image digest (`sha256:<this>`).
    pub manifest_digest: String,
    /// `name:tag` recorded in both archives.
    pub reference: String,
    mtime: u64,
}

/// Assemble config and manifest. `arch` is the OCI architecture (`amd64`, `arm64`); `created`
/// is SOURCE_DATE_EPOCH.
pub fn build(
    layers: Vec<LayerInput>,
    run: &RunConfig,
    arch: &str,
    created: u64,
    reference: &str,
) -> Result<Image> {
    let created_s = rfc3339(created);
    let mut done = Vec::new();
    for l in &layers {
        let gz = gzip(&l.tar)?;
        done.push(Layer {
            diff_id: sha256_hex(&l.tar),
            digest: sha256_hex(&gz),
            gzip: gz,
            tar: l.tar.clone(),
        });
    }
    let set = |items: &[String]| -> Value {
        items
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let mut cfg = serde_json::Map::new();
    cfg.insert("Entrypoint".into(), json!(run.entrypoint));
    if !run.cmd.is_empty() {
        cfg.insert("Cmd".into(), json!(run.cmd));
    }
    cfg.insert("Env".into(), json!(run.env));
    cfg.insert("ExposedPorts".into(), set(&run.exposed_ports));
    cfg.insert("Volumes".into(), set(&run.volumes));
    cfg.insert("WorkingDir".into(), json!(run.working_dir));
    cfg.insert("StopSignal".into(), json!(run.stop_signal));
    if !run.labels.is_empty() {
        cfg.insert("Labels".into(), json!(run.labels));
    }
    let config = canonical_json(&json!({
        "architecture": arch,
        "os": "linux",
        "created": created_s,
        "config": Value::Object(cfg),
        "rootfs": {
            "type": "layers",
            "diff_ids": done.iter().map(|l| format!("sha256:{}", l.diff_id)).collect::<Vec<_>>(),
        },
        "history": layers.iter().map(|l| json!({"created": created_s, "created_by": l.created_by})).collect::<Vec<_>>(),
    }));
    let config_digest = sha256_hex(&config);
    let manifest = canonical_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": done.iter().map(|l| json!({
            "mediaType": MEDIA_LAYER_GZIP, "digest": format!("sha256:{}", l.digest), "size": l.gzip.len(),
        })).collect::<Vec<_>>(),
    }));
    let manifest_digest = sha256_hex(&manifest);
    Ok(Image {
        layers: done,
        config,
        config_digest,
        manifest,
        manifest_digest,
        reference: reference.to_string(),
        mtime: created,
    })
}

fn file(a: &mut Archive, path: &str, data: Vec<u8>) -> Result<()> {
    a.add(
        path,
        Record::File {
            mode: 0o644,
            source: Source::Bytes(data),
        },
    )
}

impl Image {
    /// The OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) as a tar.
    pub fn oci_archive(&self) -> Result<Vec<u8>> {
        let tag = self.reference.rsplit_once(':').map_or("latest", |(_, t)| t);
        let index = canonical_json(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [{
                "mediaType": MEDIA_MANIFEST,
                "digest": format!("sha256:{}", self.manifest_digest),
                "size": self.manifest.len(),
                "annotations": {
                    "org.opencontainers.image.ref.name": tag,
                    "io.containerd.image.name": self.reference,
                },
            }],
        }));
        let mut a = Archive::new();
        a.add("/blobs", Record::Dir { mode: 0o755 })?;
        a.add("/blobs/sha256", Record::Dir { mode: 0o755 })?;
        file(
            &mut a,
            "/oci-layout",
            canonical_json(&json!({"imageLayoutVersion": "1.0.0"})),
        )?;
        file(&mut a, "/index.json", index)?;
        file(
            &mut a,
            &format!("/blobs/sha256/{}", self.manifest_digest),
            self.manifest.clone(),
        )?;
        file(
            &mut a,
            &format!("/blobs/sha256/{}", self.config_digest),
            self.config.clone(),
        )?;
        for l in &self.layers {
            // Two identical layers share one blob.
            let p = format!("/blobs/sha256/{}", l.digest);
            if !a.contains(&p) {
                file(&mut a, &p, l.gzip.clone())?;
            }
        }
        a.to_tar(self.mtime).context("writing the OCI archive")
    }

    /// The `docker load` format: `manifest.json`, the config, one uncompressed tar per layer.
    pub fn docker_archive(&self) -> Result<Vec<u8>> {
        let layer_paths: Vec<String> = self
            .layers
            .iter()
            .map(|l| format!("{}/layer.tar", l.diff_id))
            .collect();
        let manifest = canonical_json(&json!([{
            "Config": format!("{}.json", self.config_digest),
            "RepoTags": [self.reference],
            "Layers": layer_paths,
        }]));
        let (name, tag) = self
            .reference
            .rsplit_once(':')
            .unwrap_or((&self.reference, "latest"));
        let top = self
            .layers
            .last()
            .map(|l| l.diff_id.clone())
            .unwrap_or_default();
        let repositories = canonical_json(&json!({ name: { tag: top } }));
        let mut a = Archive::new();
        file(&mut a, "/manifest.json", manifest)?;
        file(&mut a, "/repositories", repositories)?;
        file(
            &mut a,
            &format!("/{}.json", self.config_digest),
            self.config.clone(),
        )?;
        for (l, p) in self.layers.iter().zip(&layer_paths) {
            if !a.contains(p) {
                file(&mut a, p, l.tar.clone())?;
            }
        }
        a.to_tar(self.mtime).context("writing the docker archive")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Image {
        let mut a = Archive::new();
        a.add(
            "/etc/motd",
            Record::File {
                mode: 0o644,
                source: Source::Bytes(b"hi\n".to_vec()),
            },
        )
        .unwrap();
        let mut b = Archive::new();
        b.add(
            "/usr/bin/tool",
            Record::File {
                mode: 0o755,
                source: Source::Bytes(b"\x7fELF".to_vec()),
            },
        )
        .unwrap();
        let run = RunConfig {
            entrypoint: vec!["/usr/bin/tool".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/usr/bin".into()],
            exposed_ports: vec!["80/tcp".into(), "67/udp".into()],
            volumes: vec!["/srv/vms".into()],
            working_dir: "/".into(),
            stop_signal: "SIGTERM".into(),
            labels: BTreeMap::from([("z".into(), "1".into()), ("a".into(), "2".into())]),
        };
        build(
            vec![
                LayerInput {
                    tar: a.to_tar(1_700_000_000).unwrap(),
                    created_by: "motd".into(),
                },
                LayerInput {
                    tar: b.to_tar(1_700_000_000).unwrap(),
                    created_by: "tool".into(),
                },
            ],
            &run,
            "amd64",
            1_700_000_000,
            "pxelab/test:latest",
        )
        .unwrap()
    }

    /// JSON read into ordered maps: re-serializing it gives sorted keys whatever serde_json's
    /// features are.
    #[derive(serde::Deserialize, serde::Serialize)]
    #[serde(untagged)]
    enum Canon {
        Null,
        Bool(bool),
        Num(serde_json::Number),
        Str(String),
        Arr(Vec<Canon>),
        Obj(BTreeMap<String, Canon>),
    }

    /// True if every object in the JSON text has its keys in sorted order (and no whitespace).
    fn keys_sorted(text: &[u8]) -> bool {
        let c: Canon = serde_json::from_slice(text).unwrap();
        serde_json::to_vec(&c).unwrap() == text
    }

    #[test]
    fn same_inputs_same_bytes_and_digest() {
        let (a, b) = (tiny(), tiny());
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(a.oci_archive().unwrap(), b.oci_archive().unwrap());
        assert_eq!(a.docker_archive().unwrap(), b.docker_archive().unwrap());
        assert!(
            keys_sorted(&a.config),
            "{}",
            String::from_utf8_lossy(&a.config)
        );
        assert!(keys_sorted(&a.manifest));
        assert!(
            !keys_sorted(br#"{"b":1,"a":2}"#),
            "the checker itself must catch unsorted keys"
        );
        assert!(String::from_utf8_lossy(&a.config)
            .starts_with("{\"architecture\":\"amd64\",\"config\":{\"Cmd\""));
    }

    #[test]
    fn config_manifest_and_archives_agree() {
        let img = tiny();
        let cfg: Value = serde_json::from_slice(&img.config).unwrap();
        assert_eq!(cfg["created"], "2023-11-14T22:13:20Z");
        assert_eq!(cfg["config"]["Entrypoint"], json!(["/usr/bin/tool"]));
        assert_eq!(
            cfg["config"]["ExposedPorts"],
            json!({"67/udp": {}, "80/tcp": {}})
        );
        assert_eq!(cfg["config"]["Volumes"], json!({"/srv/vms": {}}));
        assert_eq!(
            cfg["rootfs"]["diff_ids"][1],
            format!("sha256:{}", img.layers[1].diff_id)
        );
        let man: Value = serde_json::from_slice(&img.manifest).unwrap();
        assert_eq!(
            man["config"]["digest"],
            format!("sha256:{}", img.config_digest)
        );
        assert_eq!(man["layers"][0]["size"], img.layers[0].gzip.len());

        // Every blob in the OCI archive is named by its own sha256.
        let oci = img.oci_archive().unwrap();
        let mut names = Vec::new();
        for e in tar::Archive::new(oci.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            if let Some(d) = path.strip_prefix("blobs/sha256/").filter(|d| !d.is_empty()) {
                assert_eq!(sha256_hex(&data), d);
            }
            if path == "index.json" {
                let idx: Value = serde_json::from_slice(&data).unwrap();
                assert_eq!(
                    idx["manifests"][0]["digest"],
                    format!("sha256:{}", img.manifest_digest)
                );
                assert_eq!(
                    idx["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
                    "latest"
                );
                assert!(keys_sorted(&data));
            }
            names.push(path);
        }
        assert!(names.contains(&"oci-layout".to_string()));
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("blobs/sha256/") && n.len() > 14)
                .count(),
            4
        );

        let docker = img.docker_archive().unwrap();
        let mut files = BTreeMap::new();
        for e in tar::Archive::new(docker.as_slice()).entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            files.insert(path, data);
        }
        let m: Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(m[0]["RepoTags"], json!(["pxelab/test:latest"]));
        let layer0 = m[0]["Layers"][0].as_str().unwrap();
        assert_eq!(sha256_hex(&files[layer0]), img.layers[0].diff_id);
        assert_eq!(files[m[0]["Config"].as_str().unwrap()], img.config);
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
