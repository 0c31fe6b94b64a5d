//! Prune benchmark: a vault with many files and 100 snapshots, then one `cairn prune` with the
//! default retention policy.
//!
//! `prune_bench build DATA_DIR FILES SNAPSHOTS` writes the vault through the engine (no
//! daemon): FILES files in directories of 100, one in ten of 16 KiB (one chunk each) and the
//! rest 1 KiB (inline in the tree); then SNAPSHOTS snapshots 12 hours apart, each rewriting
//! 1 % of the files. `prune_bench prune DATA_DIR` runs the prune in a fresh process and
//! prints its report, the time it took and the process's peak RSS, so the build's memory
//! does not count.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use cairn_daemon::{OpenVault, PruneOptions, VaultState, prune};
use cairn_store::{ChunkSealer, Durability, WriteOptions, write_file_with};
use cairn_vault::{Attrs, Change, RetentionPolicy, VaultPath, content_from_manifest};

const HOUR_MS: u64 = 3_600_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("build") => {
            let n = |i: usize, d: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
            build(Path::new(&args[2]), n(3, 100_000), n(4, 100));
        }
        Some("prune") => run_prune(Path::new(&args[2])),
        _ => eprintln!("usage: prune_bench build DATA_DIR FILES SNAPSHOTS | prune DATA_DIR"),
    }
}

/// splitmix64: fast deterministic bytes.
fn fill(seed: u64, buf: &mut [u8]) {
    let mut s = seed;
    for c in buf.chunks_mut(8) {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        c.copy_from_slice(&z.to_le_bytes()[..c.len()]);
    }
}

fn change(device: &OpenVault, i: usize, version: u64) -> (VaultPath, Change) {
    let path = VaultPath::new(&format!("d{:04}/f{:06}.bin", i / 100, i)).unwrap();
    let big = i.is_multiple_of(10);
    let mut bytes = vec![0u8; if big { 16 << 10 } else { 1 << 10 }];
    fill((i as u64) << 20 | version, &mut bytes);
    if !big {
        return (path, Change::write_inline(bytes, 0o644, 0));
    }
    let (_, key) = device.keys.current_key();
    let opts = WriteOptions {
        durability: Durability::Batch,
        ..WriteOptions::default()
    };
    let m = write_file_with(&device.blobs, &key, &bytes[..], opts).unwrap();
    let (content, size) =
        content_from_manifest(device.stores.blobs.as_ref(), &ChunkSealer::new(&key), &m).unwrap();
    (
        path,
        Change::Write {
            attrs: Attrs {
                mode: 0o644,
                ..Attrs::default()
            },
            size,
            content,
        },
    )
}

fn build(data: &Path, files: usize, snapshots: usize) {
    let t = Instant::now();
    let state = VaultState::create(data, "default").unwrap();
    let device = OpenVault::open(&state).unwrap();
    let mut now = 1_700_000_000_000u64;
    let dirs: Vec<(VaultPath, Change)> = (0..files.div_ceil(100))
        .map(|d| {
            (
                VaultPath::new(&format!("d{d:04}")).unwrap(),
                Change::Mkdir {
                    attrs: Attrs {
                        mode: 0o755,
                        ..Attrs::default()
                    },
                },
            )
        })
        .collect();
    {
        let mut v = device.engine();
        v.commit(dirs, now).unwrap();
        for start in (0..files).step_by(1000) {
            let batch: Vec<_> = (start..(start + 1000).min(files))
                .map(|i| change(&device, i, 0))
                .collect();
            v.commit(batch, now).unwrap();
        }
        device.blobs.sync().unwrap();
        v.publish(&device.registry, now).unwrap();
    }
    let per = (files / 100).max(1);
    for s in 1..snapshots {
        now += 12 * HOUR_MS;
        let batch: Vec<_> = (0..per)
            .map(|k| change(&device, (s * 7919 + k * 101) % files, s as u64))
            .collect();
        let mut v = device.engine();
        v.commit(batch, now).unwrap();
        device.blobs.sync().unwrap();
        v.publish(&device.registry, now).unwrap();
    }
    let (blobs, bytes) = device.blobs.usage().unwrap();
    println!(
        "built {files} files, {snapshots} snapshots in {:.1} s: {blobs} blobs, {:.1} MiB",
        t.elapsed().as_secs_f64(),
        bytes as f64 / (1 << 20) as f64
    );
}

fn run_prune(data: &Path) {
    let state = VaultState::load(data, "default").unwrap();
    let t = Instant::now();
    let device = OpenVault::open(&state).unwrap();
    let opts = PruneOptions {
        policy: RetentionPolicy::default(),
        dry_run: false,
    };
    let r = prune(&device, &opts, |_| ControlFlow::Continue(())).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    println!(
        "prune: {:.2} s, peak RSS {hwm}; snapshots {} kept {} pruned {}; {} blobs live, removed {} ({:.1} MiB) of {} examined",
        secs,
        r.snapshots,
        r.kept,
        r.pruned,
        r.live_blobs,
        r.removed_blobs,
        r.removed_bytes as f64 / (1 << 20) as f64,
        r.examined_blobs
    );
}
