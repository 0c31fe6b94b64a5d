//! `cairn held`, `cairn approve`, `cairn reject` (the mass-delete guard's decisions) and
//! `cairn conflicts`: the things in a vault that wait for a person.

use std::path::Path;

use anyhow::Result;
use cairn_daemon as daemon;
use daemon::HeldSummary;

/// Held deletions: from the running daemon, else from disk (the set is the same file).
pub fn list(vault_dir: &Path, json: bool) -> Result<()> {
    let held: Vec<HeldSummary> = match daemon::control_request(vault_dir, "held")? {
        Some(reply) => serde_json::from_str(reply.trim()).map_err(|e| {
            anyhow::anyhow!(
                "the daemon's held reply is unreadable ({e}); is it the same cairn version?"
            )
        })?,
        None => daemon::held_summaries(vault_dir)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&held)?);
        return Ok(());
    }
    if held.is_empty() {
        println!("nothing is held");
    }
    for h in &held {
        println!(
            "#{}  {} files ({} paths) deleted by {} at {}; still visible: {}{}",
            h.id,
            h.files,
            h.paths,
            &h.device[..8.min(h.device.len())],
            daemon::format_time(h.created_ms),
            h.sample.join(", "),
            if h.files > h.sample.len() {
                ", …"
            } else {
                ""
            }
        );
    }
    if !held.is_empty() {
        println!(
            "decide with `cairn approve [ID]` (delete everywhere) or `cairn reject [ID]` (restore everywhere)"
        );
    }
    Ok(())
}

/// Approves or rejects held deletion `id` (all of them without one) through the daemon.
pub fn decide(vault_dir: &Path, id: Option<u64>, approve: bool) -> Result<()> {
    let word = if approve { "approve" } else { "reject" };
    let line = match id {
        Some(id) => format!("{word} {id}"),
        None => word.to_string(),
    };
    let reply = daemon::control_request(vault_dir, &line)?.ok_or_else(|| {
        anyhow::anyhow!(
            "the daemon of this vault is not running; start it (`cairn mount DIR` or `cairn sync`) so the decision reaches the other members, then retry"
        )
    })?;
    let n = reply.trim();
    if approve {
        println!("deleted {n} held path(s) on this device; every member follows");
    } else {
        println!("restored {n} held path(s); every member gets them back");
    }
    Ok(())
}

/// `cairn conflicts`: every conflict copy with both sides' author, time and size.
pub fn conflicts(state: &daemon::VaultState, json: bool) -> Result<()> {
    let list = daemon::conflicts(state)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no conflicts");
    }
    let me = state.device.device_id().to_string();
    let who = |d: &str| {
        if d == me {
            format!("{} (this device)", &d[..8])
        } else {
            d[..8.min(d.len())].to_string()
        }
    };
    for c in &list {
        println!("{}", c.path);
        match &c.current {
            Some(s) => println!(
                "  kept name: {} at {}, {} bytes",
                who(&s.device),
                daemon::format_time(s.modified_ms),
                s.size
            ),
            None => println!("  kept name: deleted since"),
        }
        let s = &c.copy_side;
        println!(
            "  copy:      {} at {}, {} bytes  ->  {}",
            who(&s.device),
            daemon::format_time(s.modified_ms),
            s.size,
            c.copy
        );
    }
    if !list.is_empty() {
        println!("resolve with `cairn resolve PATH --keep mine|theirs|both|NAME`");
    }
    Ok(())
}
