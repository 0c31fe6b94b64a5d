//! `cairn prune [--dry-run]`: applies the `[history]` retention policy and frees what no kept
//! snapshot needs (see `cairn_daemon::prune` for the rules and their safety).

use anyhow::Result;
use cairn_daemon::{PruneOptions, PruneReport, PrunedBy, VaultState};

use crate::status::bytes;

pub fn run(state: &VaultState, policy: cairn_vault::RetentionPolicy, dry_run: bool) -> Result<()> {
    let (r, by) = cairn_daemon::prune_vault(state, &PruneOptions { policy, dry_run })?;
    print!("{}", describe(&r, by));
    Ok(())
}

fn describe(r: &PruneReport, by: PrunedBy) -> String {
    let mut out = String::new();
    let snaps = format!(
        "{} of {} snapshots (all members), keeping {}",
        r.pruned, r.snapshots, r.kept
    );
    if r.dry_run {
        out += &format!(
            "would prune {snaps}\nwould free {} blobs, {}\n",
            r.garbage_blobs,
            bytes(r.garbage_bytes)
        );
    } else {
        out += &format!(
            "pruned {snaps}\nfreed {} blobs, {}{}\n",
            r.removed_blobs,
            bytes(r.removed_bytes),
            match by {
                PrunedBy::Daemon => " (by the running daemon)",
                PrunedBy::ThisProcess => "",
            }
        );
        if r.kept_written > 0 {
            out += &format!(
                "{} blobs were written again while pruning and stay\n",
                r.kept_written
            );
        }
    }
    out += &format!(
        "{} blobs stay, referenced by the kept snapshots, the local overlay or held deletions\n",
        r.live_blobs
    );
    if r.not_held > 0 {
        out += &format!(
            "{} parts of kept snapshots are not on this device (other members' history); their authors keep them\n",
            r.not_held
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_says_what_was_or_would_be_freed() {
        let r = PruneReport {
            dry_run: true,
            snapshots: 10,
            kept: 3,
            pruned: 7,
            garbage_blobs: 40,
            garbage_bytes: 3 << 20,
            live_blobs: 12,
            ..PruneReport::default()
        };
        let text = describe(&r, PrunedBy::ThisProcess);
        assert!(text.contains("would prune 7 of 10 snapshots"), "{text}");
        assert!(text.contains("would free 40 blobs, 3.0 MiB"), "{text}");
        let done = PruneReport {
            dry_run: false,
            removed_blobs: 40,
            removed_bytes: 3 << 20,
            ..r
        };
        let text = describe(&done, PrunedBy::Daemon);
        assert!(
            text.contains("freed 40 blobs, 3.0 MiB (by the running daemon)"),
            "{text}"
        );
    }
}
