//! Throughput and memory figures for a 1M-entry tree.
//!
//! `cargo run --release -p cairn-tree --example tree_bench [-- N]`
//!
//! The scan phase runs in a child process (this binary re-executed with `--scan`) so its peak
//! RSS is not inflated by the build phase.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_tree::{
    CacheConfig, Edit, FileNodeStore, FileStoreOptions, MemoryNodeStore, NodeId, NodeStore, Tree,
    TreeConfig,
};

fn entries(n: usize) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> {
    (0..n).map(|i| {
        let key = format!(
            "dir{:04}/sub{:02}/file{:06}.txt",
            i / 1000,
            (i / 100) % 10,
            i
        );
        let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        let len = 40 + (x % 61) as usize;
        let value = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        (key.into_bytes(), value)
    })
}

fn vm_hwm_kib() -> u64 {
    status_field("VmHWM:")
}

fn vm_rss_kib() -> u64 {
    status_field("VmRSS:")
}

fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn bench_apply<S: NodeStore>(label: &str, tree: &Tree<S>, root: &NodeId, n: usize) {
    let depth = tree.depth(root).expect("depth");
    let mut times = Vec::new();
    let mut written = Vec::new();
    for run in 0..21 {
        let i = (run * 47_317 + 12_345) % n;
        let (key, _) = entries(i + 1).last().expect("entry");
        let start = Instant::now();
        let upd = tree
            .apply(
                root,
                [Edit::Upsert(key, format!("new value {run}").into_bytes())],
            )
            .expect("apply");
        times.push(start.elapsed());
        written.push(upd.stats.nodes_written);
    }
    println!(
        "  {label:<28} median {:>7.3} ms  (min {:.3}, max {:.3}); nodes written per change: {:?} (depth {depth})",
        ms(median(times.clone())),
        ms(*times.iter().min().expect("runs")),
        ms(*times.iter().max().expect("runs")),
        {
            let mut w = written.clone();
            w.sort();
            w.dedup();
            w
        }
    );
}

fn scan_child(dir: &str, root: &str, cache_mib: usize) {
    let before_hwm = vm_hwm_kib();
    let before_rss = vm_rss_kib();
    let store = FileNodeStore::open(dir).expect("open store");
    let tree = Tree::with_config(
        store,
        TreeConfig::default(),
        CacheConfig {
            max_bytes: cache_mib << 20,
        },
    )
    .expect("tree");
    let root = NodeId::from_hex(root).expect("root hex");
    let start = Instant::now();
    let mut n = 0u64;
    let mut bytes = 0u64;
    for r in tree.scan_all(&root) {
        let (k, v) = r.expect("scan");
        n += 1;
        bytes += (k.len() + v.len()) as u64;
    }
    let el = start.elapsed();
    let after_hwm = vm_hwm_kib();
    let cache = tree.cache_stats();
    println!(
        "  scanned {n} entries ({:.1} MB payload) in {:.0} ms = {:.2} M entries/s",
        bytes as f64 / 1e6,
        ms(el),
        n as f64 / el.as_secs_f64() / 1e6
    );
    println!(
        "  cache bound {cache_mib} MiB: used {:.1} MiB, {} nodes, {} misses",
        cache.used_bytes as f64 / (1 << 20) as f64,
        cache.nodes,
        cache.misses
    );
    println!(
        "  RSS before scan {:.1} MB, peak RSS (VmHWM) after scan {:.1} MB, delta {:.1} MB",
        before_rss as f64 / 1024.0,
        after_hwm as f64 / 1024.0,
        (after_hwm.saturating_sub(before_hwm)) as f64 / 1024.0
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--scan") {
        scan_child(&args[2], &args[3], args[4].parse().expect("cache MiB"));
        return;
    }
    let n: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    println!(
        "cairn-tree benchmark, {n} entries (keys like dir0123/sub04/file012345.txt, values 40-100 B)"
    );

    // Baselines: the same entries into a BTreeMap, and written sorted to a flat file.
    let start = Instant::now();
    let mut map = BTreeMap::new();
    for (k, v) in entries(n) {
        map.insert(k, v);
    }
    let btree = start.elapsed();
    drop(map);
    let tmp = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    {
        let f = std::fs::File::create(tmp.path().join("flat")).expect("flat file");
        let mut w = std::io::BufWriter::new(f);
        for (k, v) in entries(n) {
            w.write_all(&(k.len() as u32).to_le_bytes()).expect("write");
            w.write_all(&k).expect("write");
            w.write_all(&(v.len() as u32).to_le_bytes()).expect("write");
            w.write_all(&v).expect("write");
        }
        w.into_inner().expect("flush").sync_all().expect("sync");
    }
    let flat = start.elapsed();
    let start = Instant::now();
    let mut count = 0usize;
    for e in entries(n) {
        count += e.0.len() + e.1.len();
    }
    let gen_time = start.elapsed();
    println!("\n1. build");
    println!(
        "  generating entries alone:    {:>8.0} ms ({:.1} MB of keys+values)",
        ms(gen_time),
        count as f64 / 1e6
    );
    println!("  baseline BTreeMap insert:    {:>8.0} ms", ms(btree));
    println!("  baseline flat file + fsync:  {:>8.0} ms", ms(flat));

    let mem = Tree::new(MemoryNodeStore::new());
    let start = Instant::now();
    let built = mem.build(entries(n)).expect("build");
    let t_mem = start.elapsed();
    let depth = mem.depth(&built.root).expect("depth");
    println!(
        "  MemoryNodeStore build:       {:>8.0} ms  ({:.2}x BTreeMap, {:.2}x flat file); depth {depth}, {} nodes, {:.1} MB encoded ({:.0} B/node avg)",
        ms(t_mem),
        t_mem.as_secs_f64() / btree.as_secs_f64(),
        t_mem.as_secs_f64() / flat.as_secs_f64(),
        mem.store().len(),
        mem.store().total_bytes() as f64 / 1e6,
        mem.store().total_bytes() as f64 / mem.store().len() as f64
    );
    println!("  root {}", built.root);

    let file_dir = tmp.path().join("nodes");
    let file_tree = Tree::new(
        FileNodeStore::open_with(&file_dir, FileStoreOptions { fsync: false }).expect("store"),
    );
    let start = Instant::now();
    let fb = file_tree.build(entries(n)).expect("file build");
    let t_file = start.elapsed();
    assert_eq!(fb.root, built.root);
    println!(
        "  FileNodeStore build (no fsync):{:>7.0} ms  ({:.2}x BTreeMap); {} nodes written",
        ms(t_file),
        t_file.as_secs_f64() / btree.as_secs_f64(),
        fb.stats.nodes_written
    );
    // A full durable build costs two fsyncs per node (minutes on slow disks); the durable store
    // is measured on updates instead, over the nodes written above.
    let durable = Tree::new(FileNodeStore::open(&file_dir).expect("store"));

    println!("\n2. apply one change (upsert of an existing key, 21 runs)");
    bench_apply("MemoryNodeStore:", &mem, &built.root, n);
    bench_apply("FileNodeStore (fsync):", &durable, &built.root, n);

    println!("\n3. scan all entries from FileNodeStore in a fresh process");
    drop(mem);
    let out = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--scan",
            file_dir.to_str().expect("utf8 path"),
            &built.root.to_hex(),
            "16",
        ])
        .output()
        .expect("spawn scan child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}
