//! `cairn conflicts` and `cairn resolve`: the conflict copies the merge made, and deciding
//! one.
//!
//! The list is read from this device's last snapshot (no daemon needed). A resolution is
//! made of ordinary file operations through the live mount — unlink the copy (keep the
//! version at the name), rename the copy over the name (keep the copy's version), or rename
//! the copy to `name (device).ext` (keep both) — so it takes the road of every other write:
//! overlay, flush, snapshot, peers, and every device ends up with the same files.

use std::path::Path;

use anyhow::{Context, Result, bail};
use cairn_vault::{Entry, EntryKind, VaultPath, kept_copy_name, parse_copy_name};
use serde::{Deserialize, Serialize};

use super::mount::writable_mount;
use super::restore::vault_path;
use super::sink::view_of;
use crate::open_vault::OpenVault;
use crate::state::VaultState;

/// One side of a conflict: who wrote that version, when, how large.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConflictSide {
    /// Full device id of the author.
    pub device: String,
    /// When it was written (the version's clock, Unix ms).
    pub modified_ms: u64,
    pub size: u64,
}

/// A conflict copy and the version that kept the name.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConflictInfo {
    /// The name both versions wanted.
    pub path: String,
    /// Where the other version is kept.
    pub copy: String,
    /// The version at `path` (`None` if it was deleted since).
    pub current: Option<ConflictSide>,
    pub copy_side: ConflictSide,
}

fn side(e: &Entry) -> ConflictSide {
    ConflictSide {
        device: e.version.device.to_string(),
        modified_ms: e.version.hlc.wall_ms,
        size: e.size,
    }
}

/// Every conflict copy in this device's last snapshot, by path.
pub fn conflicts(state: &VaultState) -> Result<Vec<ConflictInfo>> {
    let device = OpenVault::open(state)?;
    let vault = device.engine();
    let view = view_of(vault.source());
    let mut out = Vec::new();
    for item in view.scan(&[], None)? {
        let (key, entry) = item?;
        let Ok(k) = cairn_vault::EntryKey::from_bytes(&key) else {
            continue;
        };
        if k.dir || entry.kind == EntryKind::Tombstone {
            continue;
        }
        let Some(parsed) = parse_copy_name(k.path.name()) else {
            continue;
        };
        let parent = k.path.parent().unwrap_or_default();
        let Ok(original) = parent.join(&parsed.original) else {
            continue;
        };
        let current = view
            .get(&original)?
            .filter(|(k, _)| !k.dir)
            .map(|(_, e)| side(&e));
        out.push(ConflictInfo {
            path: original.as_str().to_string(),
            copy: k.path.as_str().to_string(),
            current,
            copy_side: side(&entry),
        });
    }
    Ok(out)
}

/// Which version `cairn resolve` keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keep {
    /// The version this device wrote.
    Mine,
    /// The version another device wrote.
    Theirs,
    /// Both: the copy moves to `name (device).ext`.
    Both,
    /// The version now at this name: the conflict copy's name or the original name.
    Named(String),
}

impl Keep {
    pub fn parse(s: &str) -> Keep {
        match s {
            "mine" => Keep::Mine,
            "theirs" => Keep::Theirs,
            "both" => Keep::Both,
            other => Keep::Named(other.to_string()),
        }
    }
}

/// What [`resolve`] did, for the user.
pub struct Resolved {
    pub path: String,
    pub kept: String,
}

/// Resolves the conflict at `arg` (the conflict copy, or the name it lost if it has exactly
/// one copy) through the live mount.
pub fn resolve(state: &VaultState, arg: &str, keep: &Keep) -> Result<Resolved> {
    let mount = writable_mount(&state.dir).context(
        "the vault is not mounted; resolve goes through the mount so it syncs like any change: start `cairn mount DIR` and retry",
    )?;
    let p = vault_path(arg, Some(&mount.mountpoint), "PATH")?;
    let all = conflicts(state)?;
    let mine = state.device.device_id().to_string();
    let hits: Vec<&ConflictInfo> = all
        .iter()
        .filter(|c| c.copy == p.as_str() || c.path == p.as_str())
        .collect();
    let c = match hits.as_slice() {
        [one] => *one,
        [] => bail!(
            "{} is not in conflict (as of the last snapshot); `cairn conflicts` lists what is",
            p.as_str()
        ),
        many => bail!(
            "{} has {} conflict copies; name the one to resolve: {}",
            p.as_str(),
            many.len(),
            many.iter()
                .map(|c| c.copy.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let copy_is_mine = c.copy_side.device == mine;
    let current_is_mine = c.current.as_ref().is_some_and(|s| s.device == mine);
    let keep_copy = match keep {
        Keep::Both => None,
        Keep::Mine | Keep::Theirs if copy_is_mine == current_is_mine => bail!(
            "{} this device wrote; choose by name instead: --keep {} or --keep {}",
            if copy_is_mine {
                "both versions are ones"
            } else {
                "neither version is one"
            },
            file_name(&c.path),
            file_name(&c.copy)
        ),
        Keep::Mine => Some(copy_is_mine),
        Keep::Theirs => Some(!copy_is_mine),
        Keep::Named(n) if *n == file_name(&c.copy) || *n == c.copy => Some(true),
        Keep::Named(n) if *n == file_name(&c.path) || *n == c.path => Some(false),
        Keep::Named(n) => bail!(
            "--keep takes mine, theirs, both, or one of the names {} and {} (not {n:?})",
            file_name(&c.path),
            file_name(&c.copy)
        ),
    };
    let at = |v: &str| mount.mountpoint.join(v);
    let kept = match keep_copy {
        Some(true) => {
            std::fs::rename(at(&c.copy), at(&c.path))
                .with_context(|| format!("moving {} over {}", c.copy, c.path))?;
            format!("the version of {}", short(&c.copy_side.device))
        }
        Some(false) => {
            std::fs::remove_file(at(&c.copy)).with_context(|| format!("removing {}", c.copy))?;
            match &c.current {
                Some(s) => format!("the version of {}", short(&s.device)),
                None => "nothing (the name was deleted)".to_string(),
            }
        }
        None => {
            let copy = VaultPath::new(&c.copy)?;
            let name = kept_copy_name(
                &file_name(&c.path),
                &parse_copy_name(copy.name())
                    .map(|n| n.device_short)
                    .unwrap_or_else(|| short(&c.copy_side.device)),
            );
            let dest = copy.parent().unwrap_or_default().join(&name)?;
            if at(dest.as_str()).exists() {
                bail!(
                    "{} already exists; rename the copy yourself (mv) to keep both",
                    dest.as_str()
                );
            }
            std::fs::rename(at(&c.copy), at(dest.as_str()))
                .with_context(|| format!("moving {} to {}", c.copy, dest.as_str()))?;
            format!("both ({} and {})", c.path, dest.as_str())
        }
    };
    Ok(Resolved {
        path: c.path.clone(),
        kept,
    })
}

fn file_name(p: &str) -> String {
    Path::new(p)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn short(device: &str) -> String {
    device[..8.min(device.len())].to_string()
}
