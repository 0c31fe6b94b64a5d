//! `cairn prune` on a real mount: churn, prune to the newest snapshot, and what is left.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Output;

use common::*;
use rand::{RngExt, SeedableRng};

fn cli(m: &TestMount, args: &[&str]) -> Output {
    m.cli(args).output().expect("run cairn")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Bytes of every blob in the vault's store. The daemon may be writing meanwhile: a temp file
/// can vanish between the listing and its stat.
fn store_bytes(m: &TestMount) -> u64 {
    fn walk(dir: &Path) -> u64 {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some(if meta.is_dir() {
                    walk(&e.path())
                } else {
                    meta.len()
                })
            })
            .sum()
    }
    walk(&m.data_dir().join("vaults").join("default").join("store"))
}

fn write_synced(path: &Path, bytes: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

/// A config that keeps only each member's newest snapshot (the CLI sends its policy to the
/// daemon with the request).
fn keep_newest_only(m: &TestMount) {
    let dir = m.data_dir().parent().unwrap().join("config").join("cairn");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("config.toml"),
        "[history]\nkeep_within = \"0s\"\nkeep_hourly = 0\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n",
    )
    .unwrap();
}

#[test]
fn prune_after_churn_shrinks_the_store_to_the_live_data() {
    let m = TestMount::with_target(Target::Cairn);
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let mut random = |len: usize| {
        let mut v = vec![0u8; len];
        rng.fill(&mut v[..]);
        v
    };
    let keep = random(3 << 20);
    write_synced(&m.path("keep.bin"), &keep);
    let mut n = 1;
    m.wait_for_revisions(n);
    // Rewrite a file five times, then delete it: history holds six versions of it.
    for _ in 0..6 {
        write_synced(&m.path("churn.bin"), &random(4 << 20));
        n += 1;
        m.wait_for_revisions(n);
    }
    fs::remove_file(m.path("churn.bin")).unwrap();
    n += 1;
    m.wait_for_revisions(n);
    let before = store_bytes(&m);
    assert!(before > 20 << 20, "churn reached the store: {before} bytes");

    keep_newest_only(&m);
    let dry = cli(&m, &["prune", "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("would free"), "{}", text(&dry));
    assert_eq!(store_bytes(&m), before, "a dry run frees nothing");

    let run = cli(&m, &["prune"]);
    assert!(run.status.success(), "{}", text(&run));
    assert!(text(&run).contains("freed"), "{}", text(&run));
    let after = store_bytes(&m);
    let live = keep.len() as u64;
    eprintln!(
        "store before {before} B, after {after} B, live {live} B\n{}",
        text(&run)
    );
    assert!(
        (after as f64) <= 1.2 * live as f64,
        "store holds {after} bytes for {live} bytes of live data (before: {before})\n{}",
        text(&run)
    );

    // The kept snapshot reads byte-identical, through the mount and after a restart.
    assert!(fs::read(m.path("keep.bin")).unwrap() == keep);
    let mut m = m;
    m.remount();
    assert!(fs::read(m.path("keep.bin")).unwrap() == keep);

    // The deleted file's versions were only in pruned snapshots.
    let restore = cli(&m, &["restore", "churn.bin"]);
    assert!(!restore.status.success());
    assert!(text(&restore).contains("pruned"), "{}", text(&restore));
    let log = cli(&m, &["log"]);
    assert!(text(&log).contains("pruned"), "{}", text(&log));
}
