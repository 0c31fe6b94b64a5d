//! `cairn restore PATH [--at TIME] [--to DEST]`: brings one file or directory tree back from
//! this device's history, touching nothing else.
//!
//! While the vault is mounted, the restored entries are written through the mount (each file
//! under a temporary name, then renamed into place), so they take the same road as any other
//! write: overlay, flush, snapshot, peers. Without a mount, they are committed straight into
//! the engine and published, with the overlay's lock held so no daemon can start meanwhile.
//! Either way an existing, different entry at the destination is never overwritten.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use cairn_fuse::{BaseEntry, BaseLayer, Overlay, OverlayError};
use cairn_vault::{Attrs, Change, Content, Entry, EntryKind, MergedView, VaultPath};

use super::base::VaultBase;
use super::history::{format_time, parse_time, prefetch, snapshot_at, timeline};
use super::mount::writable_mount;
use super::sink::{publish, view_of};
use crate::open_vault::{OpenVault, now_ms};
use crate::state::VaultState;
use crate::timeline::{Query, SnapInfo, Timeline};

/// One entry of the tree being restored, relative to the restored root ("" is the root).
struct Item {
    rel: String,
    entry: Entry,
}

/// Turns what the user typed into a vault path: relative to the vault root, or an absolute
/// path inside the live mount.
pub(crate) fn vault_path(arg: &str, mountpoint: Option<&Path>, what: &str) -> Result<VaultPath> {
    let mut s = arg;
    if Path::new(arg).is_absolute() {
        let inside = mountpoint.and_then(|m| Path::new(arg).strip_prefix(m).ok());
        match inside {
            Some(rel) => s = rel.to_str().context("paths in a vault are UTF-8")?,
            None => bail!(
                "{what} {arg:?} is outside the vault; give it relative to the vault root (as `cairn restore docs/a.txt`){}",
                mountpoint
                    .map(|m| format!(" or as a path under {}", m.display()))
                    .unwrap_or_default()
            ),
        }
    }
    let s = s.trim_start_matches("./").trim_end_matches('/');
    let p = VaultPath::new(s).map_err(|e| {
        anyhow::anyhow!("{what} {arg:?} is not a vault path ({e}); use a path relative to the vault root such as docs/a.txt")
    })?;
    if p.is_root() {
        bail!(
            "{what} must name a file or directory, not the whole vault; to see the vault at a past time use `cairn mount --at TIME DIR`"
        );
    }
    Ok(p)
}

fn lookup_live(view: &MergedView, p: &VaultPath) -> Result<Option<Entry>> {
    Ok(view.get(p)?.map(|(_, e)| e).filter(|e| e.is_live()))
}

/// The entry at `p` and, for a directory, everything below it.
fn collect(view: &MergedView, p: &VaultPath, root: Entry) -> Result<Vec<Item>> {
    let mut items = vec![Item {
        rel: String::new(),
        entry: root,
    }];
    if items[0].entry.kind == EntryKind::Dir {
        let prefix = format!("{}/", p.as_str());
        for item in view.scan_prefix(p)? {
            let (key, entry) = item?;
            let k = cairn_vault::EntryKey::from_bytes(&key)?;
            if let Some(rel) = k.path.as_str().strip_prefix(&prefix) {
                items.push(Item {
                    rel: rel.to_string(),
                    entry,
                });
            }
        }
    }
    Ok(items)
}

fn join(base: &VaultPath, rel: &str) -> Result<VaultPath> {
    if rel.is_empty() {
        return Ok(base.clone());
    }
    Ok(VaultPath::new(&format!("{}/{rel}", base.as_str()))?)
}

pub fn restore(state: &VaultState, path: &str, at: Option<&str>, to: Option<&str>) -> Result<()> {
    let live = writable_mount(&state.dir);
    let mountpoint = live.as_ref().map(|m| m.mountpoint.as_path());
    let src = vault_path(path, mountpoint, "PATH")?;
    let dest = match to {
        Some(t) => vault_path(t, mountpoint, "--to")?,
        None => src.clone(),
    };
    if dest.as_str().starts_with(&format!("{}/", src.as_str())) {
        bail!("--to {dest:?} is inside {src:?}; pick a destination outside the restored tree");
    }
    let device = OpenVault::open(state)?;
    let t = timeline(&device)?;
    let (from, view, root) = find_version(&device, &t, &src, at)?;
    // The version may be another member's that this device never fetched.
    prefetch(&device, from.root, Some(&src))?;
    let items = collect(&view, &src, root)?;
    let when = format!(
        "the snapshot of {} from {}",
        crate::names::Labels::load(&device).label(&from.device),
        format_time(from.created_ms)
    );
    let base = VaultBase::new(device.stores.clone(), view.clone());
    let written = match &live {
        Some(m) => through_mount(&base, &src, &dest, &items, &m.mountpoint)?,
        None => through_engine(state, &device, &dest, &items)?,
    };
    let total = items.len();
    match (written, &live) {
        (0, _) => println!(
            "{} already matches {when}; nothing to restore",
            dest.as_str()
        ),
        (n, Some(m)) => println!(
            "restored {} ({n} of {total} entries, {when}) through the mount at {}; it is in the next snapshot once flushed",
            dest.as_str(),
            m.mountpoint.display()
        ),
        (n, None) => println!(
            "restored {} ({n} of {total} entries, {when}) and published it",
            dest.as_str()
        ),
    }
    Ok(())
}

/// The snapshot (of any member) to restore from and the live entry of `src` in it.
fn find_version(
    device: &OpenVault,
    t: &Timeline,
    src: &VaultPath,
    at: Option<&str>,
) -> Result<(SnapInfo, MergedView, Entry)> {
    let source_of = |e: &SnapInfo| view_of(device.stores.source(e.root));
    if let Some(at_text) = at {
        let at_ms = parse_time(at_text, now_ms())?;
        let entry = snapshot_at(device, t, at_ms)?;
        let view = source_of(&entry);
        let Some(found) = lookup_fetching(device, &entry, &view, src)? else {
            let pruned = t.pruned_between(entry.created_ms.saturating_add(1), at_ms)?;
            if pruned > 0 {
                bail!(
                    "{:?} is not in the nearest kept snapshot before {} (from {}); the {pruned} snapshot(s) in between were pruned ([history] retention policy). Drop --at to restore its newest kept version, or see `cairn log {}`",
                    src.as_str(),
                    format_time(at_ms),
                    format_time(entry.created_ms),
                    src.as_str()
                );
            }
            bail!(
                "{:?} did not exist at {}; drop --at to restore its newest version, or see `cairn log {}`",
                src.as_str(),
                format_time(at_ms),
                src.as_str()
            );
        };
        return Ok((entry, view, found));
    }
    // Newest first, a page at a time: most restores find the path in the first pages.
    let mut n = 0;
    let snaps = t.newest_first(Query {
        before_ms: None,
        device: None,
        limit: 256,
    });
    for entry in snaps {
        let entry = entry?;
        n += 1;
        let view = source_of(&entry);
        if let Ok(Some(found)) = lookup_fetching(device, &entry, &view, src) {
            return Ok((entry, view, found));
        }
    }
    if n == 0 {
        bail!("the vault has no snapshot this device can read yet, so there is nothing to restore");
    }
    let pruned = t.pruned_between(0, u64::MAX)?;
    if pruned > 0 {
        bail!(
            "{:?} is in none of the vault's {n} kept snapshots: {pruned} older snapshot(s) were pruned ([history] retention policy), and a version only they held is gone. Check the spelling (paths are relative to the vault root) and `cairn log`",
            src.as_str()
        );
    }
    bail!(
        "{:?} is in none of the vault's {n} snapshots readable here; check the spelling (paths are relative to the vault root) and `cairn log`",
        src.as_str()
    )
}

/// [`lookup_live`]; tree nodes this device lacks (another member's old snapshot) are fetched
/// through the running daemon first.
fn lookup_fetching(
    device: &OpenVault,
    snap: &SnapInfo,
    view: &MergedView,
    p: &VaultPath,
) -> Result<Option<Entry>> {
    match lookup_live(view, p) {
        Ok(found) => Ok(found),
        Err(_) => {
            prefetch(device, snap.root, Some(p))?;
            lookup_live(view, p)
        }
    }
}

fn differs_hint(dest: &VaultPath) -> anyhow::Error {
    anyhow::anyhow!(
        "{:?} exists and differs from the version to restore; restore it beside the current one with `--to {}.restored`",
        dest.as_str(),
        dest.as_str()
    )
}

// ---- through a live mount ----

fn through_mount(
    base: &VaultBase,
    src: &VaultPath,
    dest: &VaultPath,
    items: &[Item],
    mountpoint: &Path,
) -> Result<usize> {
    let target = |rel: &str| -> Result<PathBuf> { Ok(mountpoint.join(join(dest, rel)?.as_str())) };
    let base_entry = |rel: &str| -> Result<BaseEntry> {
        base.get(join(src, rel)?.as_str())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_context(|| format!("{rel:?} vanished from the snapshot"))
    };
    // Check everything first, so a refusal changes nothing.
    let mut todo = Vec::new();
    for item in items {
        let t = target(&item.rel)?;
        match fs::symlink_metadata(&t) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => todo.push(item),
            Err(e) => return Err(e).with_context(|| format!("inspecting {}", t.display())),
            Ok(meta) => {
                let same = match item.entry.kind {
                    EntryKind::Dir => meta.is_dir(),
                    EntryKind::Symlink => {
                        meta.file_type().is_symlink()
                            && matches!(&item.entry.content, Content::Target(x) if fs::read_link(&t)?.as_os_str().as_bytes() == x.as_slice())
                    }
                    EntryKind::File => {
                        meta.is_file()
                            && meta.len() == item.entry.size
                            && same_bytes(base, &base_entry(&item.rel)?, &t)?
                    }
                    EntryKind::Tombstone => true,
                };
                if !same {
                    return Err(differs_hint(&join(dest, &item.rel)?));
                }
            }
        }
    }
    if let Some(parent) = target("")?.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut dirs = Vec::new();
    for item in &todo {
        let t = target(&item.rel)?;
        let e = &item.entry;
        match e.kind {
            EntryKind::Dir => {
                fs::create_dir(&t).with_context(|| format!("creating {}", t.display()))?;
                set_xattrs(&t, &e.xattrs)?;
                dirs.push((t, e));
            }
            EntryKind::File => {
                let tmp = temp_name(&t);
                let result = (|| -> Result<()> {
                    write_file(base, &base_entry(&item.rel)?, &tmp, time_of(e.mtime_ns))?;
                    set_xattrs(&tmp, &e.xattrs)?;
                    // Mode last: a read-only mode would refuse the steps before it.
                    fs::set_permissions(&tmp, fs::Permissions::from_mode(e.mode & 0o7777))?;
                    fs::rename(&tmp, &t)?;
                    Ok(())
                })();
                if let Err(err) = result {
                    let _ = fs::remove_file(&tmp);
                    return Err(err.context(format!("writing {}", t.display())));
                }
            }
            EntryKind::Symlink => {
                let Content::Target(target_bytes) = &e.content else {
                    bail!("symlink {:?} has no target in the snapshot", item.rel);
                };
                let tmp = temp_name(&t);
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target_bytes), &tmp)
                    .and_then(|_| fs::rename(&tmp, &t))
                    .with_context(|| format!("creating symlink {}", t.display()))?;
            }
            EntryKind::Tombstone => {}
        }
    }
    // Directory modes and times last: adding children changed the times, and a read-only
    // directory mode would have refused them.
    for (t, e) in dirs.iter().rev() {
        fs::File::open(t)?.set_modified(time_of(e.mtime_ns))?;
        fs::set_permissions(t, fs::Permissions::from_mode(e.mode & 0o7777))?;
    }
    Ok(todo.len())
}

fn temp_name(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    target.with_file_name(format!(".{name}.cairn-restore-{}", std::process::id()))
}

fn time_of(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

const BUF: usize = 1 << 20;

fn read_at(base: &VaultBase, e: &BaseEntry, pos: u64, buf: &mut [u8]) -> Result<usize> {
    base.read(e, pos, buf).map_err(|err| {
        anyhow::anyhow!(
            "reading the snapshot's copy failed: {err} (run `cairn verify` if this repeats)"
        )
    })
}

fn write_file(
    base: &VaultBase,
    e: &BaseEntry,
    to: &Path,
    mtime: std::time::SystemTime,
) -> Result<()> {
    let mut f = fs::File::options().write(true).create_new(true).open(to)?;
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    while pos < e.size {
        let n = read_at(base, e, pos, &mut buf)?;
        if n == 0 {
            bail!(
                "the snapshot's copy ended early at byte {pos} of {}",
                e.size
            );
        }
        f.write_all(&buf[..n])?;
        pos += n as u64;
    }
    f.set_modified(mtime)?;
    f.sync_all()?;
    Ok(())
}

fn same_bytes(base: &VaultBase, e: &BaseEntry, path: &Path) -> Result<bool> {
    let mut f = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut a, mut b) = (vec![0u8; BUF], vec![0u8; BUF]);
    let mut pos = 0u64;
    while pos < e.size {
        let n = read_at(base, e, pos, &mut a)?;
        if n == 0 {
            return Ok(false);
        }
        if f.read_exact(&mut b[..n]).is_err() || a[..n] != b[..n] {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(f.read(&mut b[..1])? == 0)
}

fn set_xattrs(path: &Path, xattrs: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    for (k, v) in xattrs {
        let name = std::ffi::CString::new(k.clone())?;
        // SAFETY: NUL-terminated path and name, and a value buffer of the given length.
        let rc =
            unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!(
                    "setting xattr {} on {}",
                    String::from_utf8_lossy(k),
                    path.display()
                )
            });
        }
    }
    Ok(())
}

// ---- straight into the engine ----

fn through_engine(
    state: &VaultState,
    device: &OpenVault,
    dest: &VaultPath,
    items: &[Item],
) -> Result<usize> {
    // Holding the overlay's lock keeps a daemon from starting (and replaying older local
    // changes over the restored entries) until the snapshot is published.
    let overlay = Overlay::open(state.dir.join("overlay")).map_err(|e| match e {
        OverlayError::Locked { .. } => anyhow::anyhow!(
            "a cairn daemon just started for vault {:?}; run the restore again (it will go through the mount)",
            state.name
        ),
        e => anyhow::Error::new(e).context("opening the local overlay"),
    })?;
    let mut vault = device.engine();
    let mut changes = Vec::new();
    for item in items {
        let p = join(dest, &item.rel)?;
        // An ownership record is no pending change: it outlives every flush by design.
        if overlay
            .get(p.as_str())?
            .is_some_and(|r| r.kind != cairn_fuse::Kind::Owner)
        {
            bail!(
                "{:?} has local changes that are not in a snapshot yet; mount the vault so they are flushed, then restore again (or use --to)",
                p.as_str()
            );
        }
        let e = &item.entry;
        match vault.lookup(&p)? {
            None => {}
            Some((_, cur)) => {
                let same = cur.kind == e.kind
                    && (e.kind == EntryKind::Dir
                        || (cur.size == e.size && cur.content == e.content));
                if !same {
                    return Err(differs_hint(&p));
                }
                continue;
            }
        }
        let attrs = Attrs {
            mode: e.mode & 0o7777,
            mtime_ns: e.mtime_ns,
            xattrs: e.xattrs.clone(),
        };
        let change = match e.kind {
            EntryKind::Dir => Change::Mkdir { attrs },
            EntryKind::File => Change::Write {
                attrs,
                size: e.size,
                content: e.content.clone(),
            },
            EntryKind::Symlink => match &e.content {
                Content::Target(t) => Change::Symlink {
                    target: t.clone(),
                    mtime_ns: e.mtime_ns,
                    xattrs: attrs.xattrs.clone(),
                },
                _ => bail!("symlink {:?} has no target in the snapshot", item.rel),
            },
            EntryKind::Tombstone => continue,
        };
        changes.push((p, change));
    }
    if changes.is_empty() {
        return Ok(0);
    }
    // Missing parents of the destination are created as plain directories.
    let mut parents = Vec::new();
    let mut up = dest.parent();
    while let Some(p) = up.filter(|p| !p.is_root()) {
        if vault.lookup(&p)?.is_some() {
            break;
        }
        up = p.parent();
        parents.push(p);
    }
    let now = now_ms();
    let mkdirs = parents.into_iter().rev().map(|p| {
        (
            p,
            Change::Mkdir {
                attrs: Attrs {
                    mode: 0o755,
                    mtime_ns: (now as i64).saturating_mul(1_000_000),
                    xattrs: BTreeMap::new(),
                },
            },
        )
    });
    let n = changes.len();
    let all: Vec<_> = mkdirs.chain(changes).collect();
    vault
        .commit(all, now)
        .context("the engine refused the restored entries")?;
    publish(device, &mut vault, now).context("publishing the restored entries")?;
    drop(overlay);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_vault_relative_or_inside_the_mount() {
        let m = Path::new("/home/u/Cairn");
        assert_eq!(
            vault_path("a/b.txt", None, "PATH").unwrap().as_str(),
            "a/b.txt"
        );
        assert_eq!(vault_path("./a/", None, "PATH").unwrap().as_str(), "a");
        assert_eq!(
            vault_path("/home/u/Cairn/x/y", Some(m), "PATH")
                .unwrap()
                .as_str(),
            "x/y"
        );
        let err = vault_path("/etc/passwd", Some(m), "PATH")
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vault"), "{err}");
        assert!(vault_path(".", None, "PATH").is_err());
        assert!(vault_path("a/../b", None, "PATH").is_err());
    }
}
