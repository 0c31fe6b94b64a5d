//! Printing `cairn status` for people; the report itself comes from `cairn_daemon::report`.

use cairn_daemon::{Report, format_time};

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Shows at most this many pending paths and conflicts; `--json` has them all.
const SHOW: usize = 10;

pub fn print_human(r: &Report) {
    println!("vault:     {} ({})", r.vault, r.state);
    println!("vault id:  {}", r.vault_id);
    println!("device id: {}", r.device_id);
    println!("key epoch: {} ({})", r.key_epoch, r.key_epoch_id);
    println!("state dir: {}", r.state_dir.display());
    if let Some(d) = &r.disk {
        if d.full {
            println!(
                "disk:      FULL: {} free on the disk of {}, below the {} cairn keeps free; writes into the mount fail with \"No space left on device\" until you free space there (nothing already written is lost; syncing resumes by itself)",
                bytes(d.free_bytes),
                r.state_dir.display(),
                bytes(d.reserve_bytes)
            );
        } else {
            println!(
                "disk:      {} free of {}",
                bytes(d.free_bytes),
                bytes(d.total_bytes)
            );
        }
    }
    match &r.mount {
        Some(m) => println!(
            "mounted:   {} (daemon pid {})",
            m.mountpoint.display(),
            m.pid
        ),
        None => println!("mounted:   no (start with `cairn mount DIR`)"),
    }
    println!(
        "pending:   {} path(s), {} to upload",
        r.pending_uploads.files,
        bytes(r.pending_uploads.bytes)
    );
    for p in r.pending_uploads.paths.iter().take(SHOW) {
        println!("           {p}");
    }
    if r.pending_uploads.paths.len() > SHOW {
        println!(
            "           … and {} more (`cairn status --json` lists all)",
            r.pending_uploads.paths.len() - SHOW
        );
    }
    if r.ignored.files > 0 {
        println!(
            "ignored:   {} path(s), {}, kept on this device by .cairnignore",
            r.ignored.files,
            bytes(r.ignored.bytes)
        );
    }
    match &r.last_snapshot {
        Some(s) => println!(
            "snapshot:  revision {} from {}, {} entries ({})",
            s.revision,
            s.created,
            s.entries,
            &s.id[..16.min(s.id.len())]
        ),
        None if r.state == "disk full" => {
            println!(
                "snapshot:  unknown (the vault's databases cannot be read while the disk is full)"
            )
        }
        None => println!("snapshot:  none yet"),
    }
    let l = &r.local;
    println!(
        "local:     {} of {} here ({} of {} files complete), {} pinned; mode {}",
        bytes(l.bytes_local),
        bytes(l.bytes),
        l.files_local,
        l.files,
        bytes(l.bytes_pinned),
        l.mode
    );
    if r.state == "disk full" && r.last_snapshot.is_none() {
        // Conflicts come from the same databases: say nothing rather than "none".
    } else if r.conflicts.is_empty() {
        println!("conflicts: none");
    } else {
        println!(
            "conflicts: {} (both versions kept; keep one and delete the other)",
            r.conflicts.len()
        );
        for c in r.conflicts.iter().take(SHOW) {
            println!("           {c}");
        }
    }
    for h in &r.held {
        println!(
            "held:      #{} {} files deleted by {} at {}, still visible (`cairn held`, `cairn approve`, `cairn reject`)",
            h.id,
            h.files,
            &h.device[..8.min(h.device.len())],
            cairn_daemon::format_time(h.created_ms)
        );
    }
    if r.mount.is_some() {
        let connected = r.peers.iter().filter(|p| p.connected).count();
        println!(
            "peers:     {connected} connected of {} known",
            r.peers.len()
        );
        for p in &r.peers {
            let state = if p.connected {
                match &p.path {
                    Some(path) => format!("connected via {path}"),
                    None => "connected".to_string(),
                }
            } else {
                match p.last_contact_ms {
                    Some(ms) => format!("last seen {}", format_time(ms)),
                    None => "never seen".to_string(),
                }
            };
            let who = match &p.name {
                Some(n) => format!("{n} ({})", &p.device[..p.device.len().min(8)]),
                None => p.device.clone(),
            };
            println!("           {who} {state}");
        }
        if r.downloads.chunks > 0 {
            println!(
                "downloads: {} chunk(s), {}",
                r.downloads.chunks,
                bytes(r.downloads.bytes)
            );
        }
        if let Some(ms) = r.last_flush_ms {
            println!("flushed:   {}", format_time(ms));
        }
    }
    if !r.peer_faults.is_empty() {
        println!(
            "misbehaving devices: {} (their bad files read as I/O errors, everything else keeps syncing; remove a device you do not trust with `cairn remove-device ID`)",
            r.peer_faults.len()
        );
        for f in &r.peer_faults {
            let times = if f.count > 1 {
                format!(" ({} times)", f.count)
            } else {
                String::new()
            };
            println!(
                "           {} {}{times}, last {}: {}",
                f.device,
                f.kind.describe(),
                format_time(f.last_ms),
                f.detail
            );
        }
    }
    if let Some(e) = &r.last_error {
        println!(
            "error:     {e} (see the log in {}/log)",
            r.state_dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_person_would_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
