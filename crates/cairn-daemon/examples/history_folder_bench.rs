//! Fills a real, initialised (`cairn init`) but stopped device with history for
//! `scripts/bench/history_dir.sh`: first one snapshot with FILES small files (the tree whose
//! past copy `ls -lR` walks), then SNAPSHOTS snapshots written in turn by this device and two
//! more made-up devices (each commits a small change and snapshots, merging the others' heads
//! every 10 rounds), the way `history_bench` does at library level. The other devices seal
//! to this device's recipients and read through the vault's shared history identity, so this
//! device can open all of their headers, as for real members.
//!
//! `cargo run -p cairn-daemon --example history_folder_bench -- DATA_DIR SNAPSHOTS FILES`

use std::time::Instant;

use cairn_crypto::{AgeIdentity, DeviceKey};
use cairn_daemon::{OpenVault, VaultState};
use cairn_vault::{Attrs, Change, Keyring, Vault, VaultPath};

fn mkdir(path: &str) -> (VaultPath, Change) {
    (
        VaultPath::new(path).unwrap(),
        Change::Mkdir {
            attrs: Attrs {
                mode: 0o755,
                mtime_ns: 0,
                xattrs: Default::default(),
            },
        },
    )
}

fn main() {
    let mut args = std::env::args().skip(1);
    let data = std::path::PathBuf::from(args.next().expect("DATA_DIR"));
    let total: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let files: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let state = VaultState::load(&data, "default").expect("vault state (run cairn init first)");
    let dev = OpenVault::open(&state).expect("open the vault");
    let mut now = 1_700_000_000_000u64;
    let t = Instant::now();
    {
        let mut v = dev.engine();
        if files > 0 {
            let mut changes = vec![mkdir("tree")];
            for i in 0..files {
                if i % 100 == 0 {
                    changes.push(mkdir(&format!("tree/d{:04}", i / 100)));
                }
                changes.push((
                    VaultPath::new(&format!("tree/d{:04}/f{i:06}.txt", i / 100)).unwrap(),
                    Change::write_inline(format!("file {i}").into_bytes(), 0o644, 0),
                ));
                if changes.len() >= 5000 {
                    v.commit(std::mem::take(&mut changes), now).expect("commit");
                }
            }
            v.commit(changes, now).expect("commit");
            v.snapshot(now).expect("snapshot");
            println!(
                "one snapshot of {files} files in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
    }
    let keys = dev.engine().keys().clone();
    let ids: Vec<AgeIdentity> = (0..2).map(|_| AgeIdentity::generate()).collect();
    let mut recipients = keys.recipients.clone();
    recipients.extend(ids.iter().map(|i| i.recipient()));
    let mut others: Vec<Vault> = ids
        .iter()
        .map(|id| {
            Vault::new(
                dev.stores.clone(),
                Keyring {
                    vault: keys.vault,
                    identity: id.clone(),
                    recipients: recipients.clone(),
                    history: keys.history.clone(),
                },
                DeviceKey::generate(),
            )
        })
        .collect();
    let t = Instant::now();
    let mut made = 0;
    let mut round = 0u64;
    while made < total {
        for d in 0..3 {
            if made >= total {
                break;
            }
            now += 1000;
            let mut changes = Vec::new();
            if round == 0 {
                changes.push(mkdir(&format!("dev{d}")));
            }
            changes.push((
                VaultPath::new(&format!("dev{d}/file{:04}.txt", round % 500)).unwrap(),
                Change::write_inline(format!("round {round}").into_bytes(), 0o644, 0),
            ));
            if d == 0 {
                let mut v = dev.engine();
                v.commit(changes, now).expect("commit");
                v.snapshot(now).expect("snapshot");
            } else {
                let v = &mut others[d - 1];
                v.commit(changes, now).expect("commit");
                v.snapshot(now).expect("snapshot");
            }
            made += 1;
        }
        if round % 10 == 9 {
            let mut heads: Vec<_> = others.iter().map(|v| v.head().unwrap().id).collect();
            heads.push(dev.engine().head().unwrap().id);
            for v in others.iter_mut() {
                for h in &heads {
                    if Some(*h) != v.head().map(|s| s.id) {
                        v.receive(*h).expect("merge");
                    }
                }
            }
            let mut v = dev.engine();
            for h in &heads {
                if Some(*h) != v.head().map(|s| s.id) {
                    v.receive(*h).expect("merge");
                }
            }
        }
        round += 1;
    }
    // The others' last snapshots too, then announce this device's head in its registry.
    let mut v = dev.engine();
    for o in &others {
        v.receive(o.head().unwrap().id).expect("merge");
    }
    dev.blobs.sync().expect("sync");
    v.publish(&dev.registry, now + 1000).expect("publish");
    println!(
        "{made} snapshots from 3 devices in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
