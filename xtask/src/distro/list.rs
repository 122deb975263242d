//! `cargo xtask distro list`: every recipe and arch, what is published in the lab home, and the
//! family aliases (`debian` → the newest `debian-*`).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use anyhow::Result;
use pxelab_contract::{DistroManifest, ManifestFile};

use super::recipe::{self, Recipe};
use crate::util::human_bytes;

#[derive(clap::Args, Clone, Debug)]
pub struct ListArgs {
    /// Directory of distro recipes (default: recipes/distros in the project).
    #[arg(long, env = "PXELAB_DISTRO_RECIPES", hide = true)]
    pub recipes: Option<PathBuf>,
}

pub fn run(args: &ListArgs) -> Result<()> {
    let recipes = recipe::load_all(&super::recipes_dir(&args.recipes))?;
    let mut families: BTreeMap<&str, &Recipe> = BTreeMap::new();
    for r in &recipes {
        let newest = recipe::find(&recipes, r.family())?;
        families.insert(r.family(), newest);
    }
    println!(
        "{:<16} {:<10} {:<8} {:>10} {:>10} {:>10}  aliases",
        "distro", "arch", "pulled", "rootfs", "kernel", "modules"
    );
    for r in &recipes {
        let aliases: Vec<&str> = families
            .iter()
            .filter(|(_, n)| n.name == r.name)
            .map(|(f, _)| *f)
            .collect();
        for arch in r.arches.keys() {
            let dir = crate::lab::home::images_dir(&r.name, arch.as_str())?;
            let manifest: Option<DistroManifest> = fs::read(dir.join("manifest.json"))
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok());
            let size = |f: Option<&ManifestFile>| {
                f.map(|f| human_bytes(f.size)).unwrap_or_else(|| "-".into())
            };
            match &manifest {
                Some(m) => println!(
                    "{:<16} {:<10} {:<8} {:>10} {:>10} {:>10}  {}",
                    r.name,
                    arch.as_str(),
                    "yes",
                    size(Some(&m.rootfs)),
                    size(m.kernel.as_ref()),
                    size(m.modules.as_ref()),
                    aliases.join(",")
                ),
                None => println!(
                    "{:<16} {:<10} {:<8} {:>10} {:>10} {:>10}  {}",
                    r.name,
                    arch.as_str(),
                    "no",
                    "-",
                    "-",
                    "-",
                    aliases.join(",")
                ),
            }
        }
    }
    Ok(())
}
