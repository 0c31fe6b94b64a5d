//! Throughput of chunk + encrypt + store against a plain copy of the same bytes.
//!
//! ```text
//! cargo run --release -p cairn-store --example store_bench [-- --size-mib 1024 --runs 3 --dir /work/bench-tmp]
//! ```
//!
//! Both sides read the same pre-generated source file and end with one flush to stable
//! storage (plain: `fsync` of the copy; store: one `BlobStore::sync`), so the figures compare
//! like with like. Outputs live next to the source so all of it is on one filesystem.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_crypto::ContentKey;
use cairn_store::{
    BlobStore, ChunkSealer, Chunker, Durability, FileManifest, WriteOptions, read_file,
    write_file_with,
};

struct Args {
    size_mib: u64,
    runs: usize,
    dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        size_mib: 1024,
        runs: 3,
        dir: PathBuf::from("/work/bench-tmp"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--size-mib" => args.size_mib = value()?.parse().map_err(|e| format!("{e}"))?,
            "--runs" => args.runs = value()?.parse().map_err(|e| format!("{e}"))?,
            "--dir" => args.dir = PathBuf::from(value()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.runs == 0 || args.size_mib == 0 {
        return Err("--runs and --size-mib must be positive".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "store_bench: {e}\nusage: store_bench [--size-mib N] [--runs N] [--dir PATH]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("store_bench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    fs::create_dir_all(&args.dir)?;
    let work = tempfile::Builder::new()
        .prefix("store-bench-")
        .tempdir_in(&args.dir)?;
    let size = args.size_mib << 20;
    let source = work.path().join("source");
    // Each run gets fresh output paths and nothing is deleted until the end: ext4 scans
    // recently freed inodes when allocating new ones, so deleting a 16k-file store right
    // before a run would bill that scan to the next run (up to ~30 % of its time).
    let store_dir = |run: usize| work.path().join(format!("store-{run}"));
    let plain = |run: usize| work.path().join(format!("plain-copy-{run}"));
    let settle_dir = work.path().join("settle");

    eprintln!("generating {} MiB of incompressible data…", args.size_mib);
    let source_hash = generate(&source, size)?;
    fs::create_dir_all(store_dir(0))?;
    let same_fs = fs::metadata(&source)?.dev() == fs::metadata(store_dir(0))?.dev();
    println!(
        "dir {} (source, plain copy and store on one filesystem: {same_fs}), {} MiB, {} runs, {} cores",
        work.path().display(),
        args.size_mib,
        args.runs,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let key = ContentKey::from_bytes(*blake3::hash(b"store_bench key").as_bytes());
    let mut plain_write = Vec::new();
    let mut store_write = Vec::new();
    let mut plain_read = Vec::new();
    let mut store_read = Vec::new();
    let mut manifest = FileManifest::default();
    // CPU seconds (user + system, all threads) per phase: unlike wall time this barely
    // moves when other processes compete for the cores.
    let mut cpu = [0f64; 4];
    let mut seal_only = Vec::new();

    for run in 0..args.runs {
        settle(&settle_dir)?;
        let c0 = cpu_seconds();
        plain_write.push(time(|| plain_copy(&source, &plain(run)))?);
        cpu[0] += cpu_seconds() - c0;

        settle(&settle_dir)?;
        let store = BlobStore::open(store_dir(run))?;
        let c0 = cpu_seconds();
        let s0 = cpu_split();
        let mut sync_time = Duration::ZERO;
        let (elapsed, m) = time_with(|| -> Result<_, Box<dyn std::error::Error>> {
            let options = WriteOptions {
                durability: Durability::Batch,
                ..WriteOptions::default()
            };
            let m = write_file_with(&store, &key, File::open(&source)?, options)?;
            let t = Instant::now();
            store.sync()?;
            sync_time = t.elapsed();
            Ok(m)
        })?;
        store_write.push(elapsed);
        cpu[1] += cpu_seconds() - c0;
        let s1 = cpu_split();
        eprintln!(
            "  store cpu: user {:.2}s sys {:.2}s",
            s1.0 - s0.0,
            s1.1 - s0.1
        );
        manifest = m;

        // Read-back with warm caches on both sides, so this measures the CPU cost of
        // verify + decrypt rather than the disk.
        let c0 = cpu_seconds();
        plain_read.push(time(|| {
            io::copy(&mut File::open(plain(run))?, &mut io::sink())?;
            Ok(())
        })?);
        let c1 = cpu_seconds();
        store_read.push(time(|| {
            read_file(&store, &manifest, io::sink())?;
            Ok(())
        })?);
        cpu[2] += c1 - c0;
        cpu[3] += cpu_seconds() - c1;

        // The CPU part of the write path alone, on one thread, for diagnosis.
        seal_only.push(time(|| {
            let sealer = ChunkSealer::new(&key);
            for chunk in Chunker::new(File::open(&source)?) {
                std::hint::black_box(sealer.seal(&chunk?.data));
            }
            Ok(())
        })?);

        if run == 0 {
            let mut hasher = Hashing(blake3::Hasher::new());
            read_file(&store, &manifest, &mut hasher)?;
            if hasher.0.finalize() != source_hash {
                return Err("read-back does not match the source".into());
            }
        }
    }

    let mb = size as f64 / 1e6;
    let rate = |times: &[Duration]| mb / median(times).as_secs_f64();
    let (pw, sw, pr, sr) = (
        rate(&plain_write),
        rate(&store_write),
        rate(&plain_read),
        rate(&store_read),
    );
    println!(
        "chunks: {} (avg {} KiB)",
        manifest.chunks().len(),
        size / manifest.chunks().len().max(1) as u64 / 1024
    );
    let gib = size as f64 / (1u64 << 30) as f64 * args.runs as f64;
    let per_gib = |c: f64| c / gib;
    println!(
        "write  plain copy + fsync          : {pw:8.1} MB/s  cpu {:5.2} s/GiB  (runs: {})",
        per_gib(cpu[0]),
        list(&plain_write, mb)
    );
    println!(
        "write  chunk+encrypt+store + sync  : {sw:8.1} MB/s  cpu {:5.2} s/GiB  (runs: {})",
        per_gib(cpu[1]),
        list(&store_write, mb)
    );
    println!(
        "write  ratio store/plain           : {:8.1} %",
        100.0 * sw / pw
    );
    println!(
        "       chunk+encrypt only, 1 thread : {:8.1} MB/s  (runs: {})",
        rate(&seal_only),
        list(&seal_only, mb)
    );
    println!(
        "read   plain (page cache)          : {pr:8.1} MB/s  cpu {:5.2} s/GiB  (runs: {})",
        per_gib(cpu[2]),
        list(&plain_read, mb)
    );
    println!(
        "read   verify+decrypt (page cache) : {sr:8.1} MB/s  cpu {:5.2} s/GiB  (runs: {})",
        per_gib(cpu[3]),
        list(&store_read, mb)
    );
    println!(
        "load average at end: {}",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    drop(work);
    Ok(())
}

/// Writes pseudo-random bytes (a blake3 XOF stream) and returns their hash.
fn generate(path: &Path, size: u64) -> io::Result<blake3::Hash> {
    let mut out = File::create(path)?;
    let mut xof = blake3::Hasher::new()
        .update(b"store_bench data")
        .finalize_xof();
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = buf.len().min(left as usize);
        xof.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.sync_all()?;
    Ok(hasher.finalize())
}

fn plain_copy(from: &Path, to: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut input = File::open(from)?;
    let mut output = File::create(to)?;
    // Same read granularity as the chunker's buffer.
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n])?;
    }
    output.sync_all()?;
    Ok(())
}

/// Flushes leftovers of the previous step so it is not billed to the next one.
fn settle(dir: &Path) -> io::Result<()> {
    let store = BlobStore::open(dir).map_err(io::Error::other)?;
    store
        .put(b"settle", Durability::Batch)
        .map_err(io::Error::other)?;
    store.sync().map_err(io::Error::other)?;
    let id = cairn_store::ChunkId::of(b"settle");
    store.remove(&id).map_err(io::Error::other)?;
    Ok(())
}

fn time(
    f: impl FnOnce() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<Duration, Box<dyn std::error::Error>> {
    time_with(f).map(|(d, ())| d)
}

fn time_with<T>(
    f: impl FnOnce() -> Result<T, Box<dyn std::error::Error>>,
) -> Result<(Duration, T), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let value = f()?;
    Ok((start.elapsed(), value))
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn list(times: &[Duration], mb: f64) -> String {
    times
        .iter()
        .map(|t| format!("{:.0}", mb / t.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cpu_split() -> (f64, f64) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: as in cpu_seconds.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return (0.0, 0.0);
        }
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return 0.0;
        }
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

struct Hashing(blake3::Hasher);

impl Write for Hashing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
