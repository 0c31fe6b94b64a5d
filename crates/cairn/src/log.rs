//! `cairn log [PATH]`: the vault's timeline across every member, or the versions of one
//! file, newest first, a page at a time.

use anyhow::{Result, bail};
use cairn_daemon::{History, LogQuery, OpenVault, VaultState};
use cairn_vault::{EntryKind, VaultPath};

use crate::status::bytes;

pub struct LogArgs {
    pub path: Option<String>,
    pub stat: bool,
    pub limit: usize,
    pub before: Option<String>,
    pub device: Option<String>,
}

/// Paths listed per snapshot without `--stat`.
const SHOWN_PATHS: usize = 3;

pub fn run(state: &VaultState, args: LogArgs) -> Result<()> {
    let vault = OpenVault::open(state)?;
    let labels = cairn_daemon::Labels::load(&vault);
    let device = match args.device.as_deref() {
        None => None,
        Some("me") => Some(vault.device_id),
        Some(text) => Some(labels.resolve(&vault, text)?),
    };
    let path = match args.path.as_deref() {
        None => None,
        Some(p) => {
            let p = p.trim_start_matches("./").trim_end_matches('/');
            if p.is_empty() {
                None
            } else {
                Some(VaultPath::new(p).map_err(|e| {
                    anyhow::anyhow!("{p:?} is not a vault path ({e}); give it relative to the vault root, e.g. docs/a.txt")
                })?)
            }
        }
    };
    let before_ms = args
        .before
        .as_deref()
        .map(|t| cairn_daemon::parse_time(t, cairn_daemon::now_ms()))
        .transpose()?;
    if args.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let timeline = cairn_daemon::timeline(&vault)?;
    let q = LogQuery {
        path,
        device,
        before_ms,
        limit: args.limit,
    };
    let page = cairn_daemon::history(&vault, &timeline, &q)?;
    let mut oldest = None;
    let mut n = 0;
    match page {
        History::Timeline(lines) => {
            if lines.is_empty() {
                println!("{}", empty_message(&vault, &timeline, &q));
            }
            for l in &lines {
                let s = &l.snap;
                let c = &l.changes;
                let mut what = if c.unknown {
                    "changes unknown (the previous snapshot is not readable here)".to_string()
                } else if c.own.is_empty() {
                    "no own changes".to_string()
                } else if args.stat {
                    format!(
                        "{} added, {} modified, {} deleted, {} written",
                        c.added,
                        c.modified,
                        c.deleted,
                        bytes(c.bytes)
                    )
                } else {
                    let mut shown = c.own[..c.own.len().min(SHOWN_PATHS)].join(", ");
                    if c.own.len() > SHOWN_PATHS {
                        shown.push_str(&format!(", … ({} in all)", c.own.len()));
                    }
                    shown
                };
                if c.merged > 0 {
                    what.push_str(&format!("; merged {} from other devices", c.merged));
                }
                println!(
                    "{}  {}  #{}  {}  {what}",
                    cairn_daemon::format_time(s.created_ms),
                    labels.label(&s.device),
                    s.seq,
                    &s.id.to_string()[..12],
                );
                if args.stat {
                    for p in &c.own {
                        println!("    {p}");
                    }
                }
                oldest = Some(s.created_ms);
                n += 1;
            }
        }
        History::File(versions) => {
            if versions.is_empty() {
                println!("{}", empty_message(&vault, &timeline, &q));
            }
            for v in &versions {
                let what = match v.kind {
                    EntryKind::Tombstone => "deleted".to_string(),
                    EntryKind::Dir => "directory".to_string(),
                    EntryKind::Symlink => "symlink".to_string(),
                    EntryKind::File => bytes(v.size),
                };
                println!(
                    "{}  {}  {what}  (in snapshot {} of {}, {})",
                    cairn_daemon::format_time(v.written_ms),
                    labels.label(&v.author),
                    &v.snap.id.to_string()[..12],
                    labels.label(&v.snap.device),
                    cairn_daemon::format_time(v.snap.created_ms),
                );
                oldest = Some(v.snap.created_ms);
                n += 1;
            }
        }
    }
    if n == args.limit
        && let Some(o) = oldest
    {
        eprintln!(
            "cairn: more with `--before @{}` (or a larger --limit)",
            o.div_ceil(1000)
        );
    } else {
        // History ended here: say whether it ended because older snapshots were pruned.
        let pruned = timeline.pruned_between(0, oldest.unwrap_or(u64::MAX))?;
        if pruned > 0 {
            println!(
                "({pruned} older snapshot(s) were pruned by the [history] retention policy; versions only they held are gone)"
            );
        }
    }
    Ok(())
}

fn empty_message(vault: &OpenVault, t: &cairn_daemon::Timeline, q: &LogQuery) -> String {
    let (snapshots, gaps) = t.counts().unwrap_or((0, 0));
    if snapshots == 0 && vault.engine().head().is_none() {
        return "no snapshots yet: mount the vault and write something".to_string();
    }
    let mut m = match &q.path {
        Some(p) => format!("no history of {:?} in the snapshots listed", p.as_str()),
        None => "no snapshots in that range".to_string(),
    };
    if gaps > 0 {
        m.push_str(&format!(
            " ({gaps} older snapshot(s) are not readable on this device yet)"
        ));
    }
    m
}
