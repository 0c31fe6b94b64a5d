//! Real programs on the mount: git, tar, cp -a, diff -r, rsync; a 1 GiB file with random
//! overwrites checked after a remount; and a kill -9 crash test for fsync'd data.

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

use common::*;

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[track_caller]
fn run(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    if !out.status.success() {
        panic!(
            "{desc} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn git(dir: &Path, home: &Path, args: &[&str]) -> Output {
    run(Command::new("git")
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("LC_ALL", "C")
        .args([
            "-c",
            "user.name=Cairn Test",
            "-c",
            "user.email=test@cairn.invalid",
        ])
        .args(["-c", "init.defaultBranch=main", "-c", "core.fsync=all"])
        .args(args))
}

#[test]
fn git_init_add_commit() {
    if !have("git") {
        eprintln!("SKIPPED git_init_add_commit: `git` is not installed");
        return;
    }
    let mut m = TestMount::new();
    let home = tempfile::tempdir().unwrap();
    let repo = m.path("repo");
    fs::create_dir(&repo).unwrap();
    git(&repo, home.path(), &["init", "-q"]);
    fs::create_dir_all(repo.join("src/deep")).unwrap();
    for i in 0..50 {
        fs::write(
            repo.join(format!("src/file{i}.txt")),
            format!("line {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    fs::write(repo.join("src/deep/big.bin"), vec![42u8; 3 << 20]).unwrap();
    fs::write(repo.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(repo.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("src/file1.txt", repo.join("link")).unwrap();
    git(&repo, home.path(), &["add", "-A"]);
    git(&repo, home.path(), &["commit", "-q", "-m", "first"]);
    // a second commit with a rename, a delete and an edit
    git(
        &repo,
        home.path(),
        &["mv", "src/file2.txt", "src/renamed.txt"],
    );
    git(&repo, home.path(), &["rm", "-q", "src/file3.txt"]);
    fs::write(repo.join("src/file4.txt"), "edited\n").unwrap();
    git(&repo, home.path(), &["commit", "-q", "-a", "-m", "second"]);
    let status = git(&repo, home.path(), &["status", "--porcelain"]);
    assert!(
        status.stdout.is_empty(),
        "clean tree: {}",
        String::from_utf8_lossy(&status.stdout)
    );
    let log = git(&repo, home.path(), &["log", "--oneline"]);
    assert_eq!(String::from_utf8_lossy(&log.stdout).lines().count(), 2);
    git(&repo, home.path(), &["fsck", "--full", "--strict"]);
    git(&repo, home.path(), &["gc", "-q"]);
    m.remount();
    git(&repo, home.path(), &["fsck", "--full", "--strict"]);
    let status = git(&repo, home.path(), &["status", "--porcelain"]);
    assert!(
        status.stdout.is_empty(),
        "clean after remount: {}",
        String::from_utf8_lossy(&status.stdout)
    );
    // check out the first commit and back
    git(&repo, home.path(), &["checkout", "-q", "HEAD~1"]);
    assert!(repo.join("src/file3.txt").exists());
    git(&repo, home.path(), &["checkout", "-q", "main"]);
    assert!(!repo.join("src/file3.txt").exists());
}

/// ~3,000 small files in nested directories, with a few symlinks, modes and empty files.
fn make_tree(root: &Path, seed: u64) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut count = 0;
    for a in 0..10 {
        for b in 0..10 {
            let dir = root.join(format!("top{a}/mid{b}"));
            fs::create_dir_all(&dir).unwrap();
            for c in 0..30 {
                let len = match rng.random_range(0..10) {
                    0 => 0,
                    1 => rng.random_range(10_000..100_000),
                    _ => rng.random_range(1..4000),
                };
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                let p = dir.join(format!("f{c}.dat"));
                fs::write(&p, &data).unwrap();
                if c % 7 == 0 {
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
                }
                if c % 11 == 0 {
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
                }
                count += 1;
            }
            symlink(format!("f{}.dat", b), dir.join("link")).unwrap();
        }
        fs::create_dir(root.join(format!("top{a}/empty"))).unwrap();
    }
    count
}

#[test]
fn tar_extract_cp_back_and_diff() {
    let mut m = TestMount::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    let n = make_tree(&src, 7);
    assert!(n >= 3000);
    let archive = work.path().join("tree.tar");
    run(Command::new("tar")
        .arg("cf")
        .arg(&archive)
        .arg("-C")
        .arg(&src)
        .arg("."));

    let dest = m.path("extracted");
    fs::create_dir(&dest).unwrap();
    let t = Instant::now();
    run(Command::new("tar")
        .arg("xf")
        .arg(&archive)
        .arg("-C")
        .arg(&dest));
    eprintln!("tar x of {n} files: {:?}", t.elapsed());
    assert_snapshots_eq(&snapshot(&src), &snapshot(&dest), "tar x into the mount");

    let back = work.path().join("back");
    run(Command::new("cp").arg("-a").arg(&dest).arg(&back));
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(&back));
    assert_snapshots_eq(
        &snapshot(&src),
        &snapshot(&back),
        "cp -a back out of the mount",
    );

    // cp -a within the mount, then diff against the source
    run(Command::new("cp").arg("-a").arg(&dest).arg(m.path("copy")));
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(m.path("copy")));

    m.remount();
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(&dest));
    assert_snapshots_eq(&snapshot(&src), &snapshot(&dest), "after remount");

    // tar c from the mount reproduces the same listing
    let out = run(Command::new("tar").arg("tf").arg(&archive));
    let archive2 = work.path().join("again.tar");
    run(Command::new("tar")
        .arg("cf")
        .arg(&archive2)
        .arg("-C")
        .arg(&dest)
        .arg("."));
    let out2 = run(Command::new("tar").arg("tf").arg(&archive2));
    let mut l1: Vec<&[u8]> = out.stdout.split(|b| *b == b'\n').collect();
    let mut l2: Vec<&[u8]> = out2.stdout.split(|b| *b == b'\n').collect();
    l1.sort();
    l2.sort();
    assert_eq!(l1, l2);

    // rm -rf of the whole tree
    run(Command::new("rm").arg("-rf").arg(&dest).arg(m.path("copy")));
    assert_eq!(fs::read_dir(m.root()).unwrap().count(), 0);
}

#[test]
fn rsync_roundtrip() {
    if !have("rsync") {
        eprintln!("SKIPPED rsync_roundtrip: `rsync` is not installed");
        return;
    }
    let m = TestMount::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    make_tree(&src, 11);
    let mut src_arg = src.as_os_str().to_owned();
    src_arg.push("/");
    run(Command::new("rsync")
        .arg("-a")
        .arg(&src_arg)
        .arg(m.path("r")));
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(m.path("r")));
    // second run: nothing to transfer; then modify and sync again
    fs::write(src.join("top0/mid0/f1.dat"), b"changed").unwrap();
    fs::remove_file(src.join("top1/mid1/f2.dat")).unwrap();
    run(Command::new("rsync")
        .arg("-a")
        .arg("--delete")
        .arg(&src_arg)
        .arg(m.path("r")));
    assert_snapshots_eq(
        &snapshot(&src),
        &snapshot(&m.path("r")),
        "rsync -a --delete",
    );
    let back = work.path().join("back");
    let mut mnt_arg = m.path("r").into_os_string();
    mnt_arg.push("/");
    run(Command::new("rsync").arg("-a").arg(&mnt_arg).arg(&back));
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&src)
        .arg(&back));
}

#[test]
fn one_gib_file_with_random_overwrites() {
    const SIZE: u64 = 1 << 30;
    const BLOCK: usize = 1 << 20;
    let mut m = TestMount::new();
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = File::create(reference_dir.path().join("ref")).unwrap();
    let target = File::create(m.path("big")).unwrap();
    let mut rng = StdRng::seed_from_u64(0xB16_F11E);
    let mut block = vec![0u8; BLOCK];
    let t = Instant::now();
    for i in 0..(SIZE / BLOCK as u64) {
        rng.fill_bytes(&mut block);
        target.write_all_at(&block, i * BLOCK as u64).unwrap();
        reference.write_all_at(&block, i * BLOCK as u64).unwrap();
    }
    eprintln!("1 GiB sequential write: {:?}", t.elapsed());
    let t = Instant::now();
    for _ in 0..2000 {
        let len = rng.random_range(4096..=65536);
        let off = rng.random_range(0..SIZE - len as u64 + 4096); // may extend past the end
        rng.fill_bytes(&mut block[..len]);
        target.write_all_at(&block[..len], off).unwrap();
        reference.write_all_at(&block[..len], off).unwrap();
    }
    eprintln!("2000 random overwrites: {:?}", t.elapsed());
    drop(target);
    drop(reference);
    m.remount();
    let t = Instant::now();
    let want = hash_file(&reference_dir.path().join("ref")).unwrap();
    let got = hash_file(&m.path("big")).unwrap();
    eprintln!("hashing both: {:?}", t.elapsed());
    assert_eq!(
        fs::metadata(m.path("big")).unwrap().len(),
        fs::metadata(reference_dir.path().join("ref"))
            .unwrap()
            .len()
    );
    assert_eq!(got, want, "1 GiB file content differs after remount");
}

/// Durable-write protocol of the writer: create, write, fsync the file, fsync the directory
/// (POSIX requires the latter for the new name), and only then record (name, hash).
fn crash_writer(
    dir: OwnedFd,
    seed: u64,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<(String, blake3::Hash)>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("f{i:05}");
        i += 1;
        let cname = std::ffi::CString::new(name.as_bytes()).unwrap();
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                cname.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o644 as libc::c_uint,
            )
        };
        if fd < 0 {
            return; // the mount went away (ENOTCONN after the kill): stop writing
        }
        let mut f = unsafe { File::from_raw_fd(fd) };
        let len = rng.random_range(1..=64 * 1024);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        if f.write_all(&data).is_err() || f.sync_all().is_err() {
            return;
        }
        if unsafe { libc::fsync(dir.as_raw_fd()) } != 0 {
            return;
        }
        done.lock().unwrap().push((name, blake3::hash(&data)));
    }
}

#[test]
fn crash_kill9_keeps_fsynced_files() {
    let mut m = TestMount::new();
    let mut rng = StdRng::seed_from_u64(0x000C_2A54);
    let mut all: Vec<(String, blake3::Hash)> = Vec::new();
    let trials = 20;
    for trial in 0..trials {
        let rel = format!("trial{trial:02}");
        fs::create_dir(m.path(&rel)).unwrap();
        File::open(m.root()).unwrap().sync_all().unwrap();
        let dir: OwnedFd = File::open(m.path(&rel)).unwrap().into();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (stop, done) = (stop.clone(), done.clone());
            let seed = rng.random();
            std::thread::spawn(move || crash_writer(dir, seed, stop, done))
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(10..=300)));
        m.kill9_and_remount();
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer thread panicked");
        let recorded = std::mem::take(&mut *done.lock().unwrap());
        for (name, hash) in &recorded {
            let p = m.path(format!("{rel}/{name}"));
            let got = hash_file(&p).unwrap_or_else(|e| {
                panic!(
                    "trial {trial}: fsync'd file {p:?} lost after kill -9: {e}\n{}",
                    m.daemon_log()
                )
            });
            assert_eq!(
                &got, hash,
                "trial {trial}: fsync'd file {p:?} corrupted after kill -9"
            );
        }
        // files that were being written when the daemon died may exist partially; they
        // must at least be readable (no EIO)
        for e in fs::read_dir(m.path(&rel)).unwrap() {
            let p = e.unwrap().path();
            let mut buf = Vec::new();
            File::open(&p)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .unwrap_or_else(|e| panic!("trial {trial}: unreadable after crash: {p:?}: {e}"));
        }
        eprintln!("trial {trial}: {} fsync'd files intact", recorded.len());
        all.extend(recorded.into_iter().map(|(n, h)| (format!("{rel}/{n}"), h)));
    }
    // every file from every trial is still there after one more clean remount
    m.remount();
    for (rel, hash) in &all {
        assert_eq!(
            &hash_file(&m.path(rel)).unwrap(),
            hash,
            "{rel} after final remount"
        );
    }
    assert!(
        !all.is_empty(),
        "the writers never got a file durably written"
    );
}

#[test]
fn cp_p_and_rsync_t_keep_mtimes() {
    let m = TestMount::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("old.txt");
    fs::write(&src, b"old content").unwrap();
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_modified(old)
        .unwrap();
    run(Command::new("cp").arg("-p").arg(&src).arg(m.path("cp.txt")));
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    assert_eq!(mtime(&m.path("cp.txt")), old, "cp -p keeps the mtime");
    if have("rsync") {
        run(Command::new("rsync")
            .arg("-t")
            .arg(&src)
            .arg(m.path("rs.txt")));
        assert_eq!(mtime(&m.path("rs.txt")), old, "rsync -t keeps the mtime");
        // A second rsync -t sees equal size and mtime and leaves the file alone.
        let out = run(Command::new("rsync")
            .args(["-t", "-i"])
            .arg(&src)
            .arg(m.path("rs.txt")));
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(fs::read(m.path("cp.txt")).unwrap(), b"old content");
}

#[test]
fn git_clone_status_clean_and_gc() {
    if !have("git") {
        eprintln!("SKIPPED git_clone_status_clean_and_gc: `git` is not installed");
        return;
    }
    let m = TestMount::new();
    let home = tempfile::tempdir().unwrap();
    let origin = home.path().join("origin");
    fs::create_dir(&origin).unwrap();
    git(&origin, home.path(), &["init", "-q"]);
    for i in 0..30 {
        fs::create_dir_all(origin.join(format!("d{}", i % 5))).unwrap();
        fs::write(
            origin.join(format!("d{}/f{i}.txt", i % 5)),
            format!("{i}\n").repeat(i + 1),
        )
        .unwrap();
        if i % 10 == 9 {
            git(&origin, home.path(), &["add", "-A"]);
            git(
                &origin,
                home.path(),
                &["commit", "-q", "-m", &format!("c{i}")],
            );
        }
    }
    // A file:// URL makes git copy objects over its transport instead of hard-linking them.
    let url = format!("file://{}", origin.display());
    git(m.root(), home.path(), &["clone", "-q", &url, "clone"]);
    let clone = m.path("clone");
    let status = git(&clone, home.path(), &["status", "--porcelain"]);
    assert!(
        status.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    git(&clone, home.path(), &["gc", "-q", "--aggressive"]);
    git(&clone, home.path(), &["fsck", "--strict"]);
    let status = git(&clone, home.path(), &["status", "--porcelain"]);
    assert!(status.stdout.is_empty(), "clean after gc");
    let head = |d: &Path| git(d, home.path(), &["rev-parse", "HEAD"]).stdout;
    assert_eq!(head(&clone), head(&origin));
    assert_eq!(
        fs::read(clone.join("d4/f29.txt")).unwrap(),
        "29\n".repeat(30).as_bytes()
    );
}

#[test]
fn build_a_c_project_and_make_sees_mtimes() {
    if !have("make") || !have("cc") {
        eprintln!("SKIPPED build_a_c_project_and_make_sees_mtimes: needs make and cc");
        return;
    }
    let m = TestMount::new();
    let p = m.path("proj");
    fs::create_dir(&p).unwrap();
    fs::write(p.join("greet.h"), "const char *greet(void);\n").unwrap();
    fs::write(
        p.join("greet.c"),
        "#include \"greet.h\"\nconst char *greet(void) { return \"hello\"; }\n",
    )
    .unwrap();
    fs::write(
        p.join("main.c"),
        "#include <stdio.h>\n#include \"greet.h\"\nint main(void) { printf(\"%s from cairn\\n\", greet()); return 0; }\n",
    )
    .unwrap();
    fs::write(
        p.join("Makefile"),
        "app: main.o greet.o\n\tcc -o app main.o greet.o\n%.o: %.c greet.h\n\tcc -O1 -c $<\n",
    )
    .unwrap();
    let make = |args: &[&str]| {
        let out = run(Command::new("make").current_dir(&p).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    make(&[]);
    let out = run(&mut Command::new(p.join("app")));
    assert_eq!(out.stdout, b"hello from cairn\n");
    let q = Command::new("make")
        .current_dir(&p)
        .arg("-q")
        .status()
        .unwrap();
    assert!(q.success(), "everything up to date right after the build");
    // A newer source makes exactly its object and the program stale again.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(
        p.join("greet.c"),
        "#include \"greet.h\"\nconst char *greet(void) { return \"hi\"; }\n",
    )
    .unwrap();
    let q = Command::new("make")
        .current_dir(&p)
        .arg("-q")
        .status()
        .unwrap();
    assert!(!q.success(), "make sees greet.c newer than greet.o");
    let log = make(&[]);
    assert!(log.contains("greet.c") && !log.contains("main.c"), "{log}");
    let out = run(&mut Command::new(p.join("app")));
    assert_eq!(out.stdout, b"hi from cairn\n");
}

/// A SQLite database in WAL mode written by two processes at once; one writer is killed
/// with SIGKILL mid-transaction. The database must pass `PRAGMA integrity_check` and hold
/// every row the survivor committed.
#[test]
fn sqlite_wal_two_writers_survive_kill9() {
    let py = Command::new("python3")
        .args(["-c", "import sqlite3"])
        .status()
        .is_ok_and(|s| s.success());
    if !py {
        eprintln!("SKIPPED sqlite_wal_two_writers_survive_kill9: needs python3 with sqlite3");
        return;
    }
    let m = TestMount::new();
    let db = m.path("app.db");
    let setup = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nassert c.execute('PRAGMA journal_mode=WAL').fetchone()[0]=='wal'\nc.execute('CREATE TABLE t(w TEXT, n INTEGER, pad BLOB)')\nc.commit()\n";
    run(Command::new("python3").args(["-c", setup]).arg(&db));
    // Writes rows forever (the victim) or N rows (the survivor), one transaction each.
    let writer = "import sqlite3,sys,os\nc=sqlite3.connect(sys.argv[1],timeout=60)\nw=sys.argv[2];n=int(sys.argv[3])\ni=0\nwhile n<0 or i<n:\n  c.execute('INSERT INTO t VALUES(?,?,?)',(w,i,os.urandom(3000)))\n  c.commit();i+=1\n  if i==20: open(sys.argv[1]+'.'+w,'w').close()\n";
    let mut victim = Command::new("python3")
        .args(["-c", writer])
        .arg(&db)
        .args(["victim", "-1"])
        .spawn()
        .unwrap();
    let survivor = Command::new("python3")
        .args(["-c", writer])
        .arg(&db)
        .args(["survivor", "300"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !m.path("app.db.victim").exists() {
        assert!(Instant::now() < deadline, "the victim never got 20 rows in");
        std::thread::sleep(Duration::from_millis(20));
    }
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let out = survivor.wait_with_output().unwrap();
    assert!(out.status.success(), "survivor failed");
    let check = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nprint(c.execute('PRAGMA integrity_check').fetchone()[0])\nprint(c.execute(\"SELECT COUNT(*), COUNT(DISTINCT n) FROM t WHERE w='survivor'\").fetchone())\nprint(c.execute(\"SELECT COUNT(*) FROM t WHERE w='victim'\").fetchone()[0])\n";
    let out = run(Command::new("python3").args(["-c", check]).arg(&db));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "ok", "integrity_check: {text}");
    assert_eq!(
        lines[1], "(300, 300)",
        "every survivor row committed: {text}"
    );
    let victim_rows: u64 = lines[2].parse().unwrap();
    assert!(
        victim_rows >= 20,
        "the victim's committed rows stay: {text}"
    );
}

/// The groups of names under `root` that are one inode (`st_nlink` > 1): each group's
/// relative paths, sorted, and every name's `st_nlink` checked against the group's size.
fn link_groups(root: &Path) -> Vec<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let mut by_ino: std::collections::BTreeMap<u64, (u64, Vec<String>)> = Default::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && md.nlink() > 1 {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let g = by_ino.entry(md.ino()).or_insert((md.nlink(), Vec::new()));
                assert_eq!(g.0, md.nlink(), "{rel}: st_nlink differs between names");
                g.1.push(rel);
            }
        }
    }
    let mut groups: Vec<Vec<String>> = by_ino
        .into_values()
        .map(|(n, mut names)| {
            names.sort();
            assert_eq!(n as usize, names.len(), "st_nlink of {names:?}");
            names
        })
        .collect();
    groups.sort();
    groups
}

/// tar, `cp -al`, `rsync -aH` and `git clone --local` with hard links: links stay links
/// (one inode per group, `st_nlink` right) in the mount, back out of it, and after a
/// remount.
#[test]
fn hard_links_through_tar_cp_al_rsync_h_and_git_clone_local() {
    let mut m = TestMount::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for d in ["a", "b", "c/deep"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::write(src.join("a/one"), b"one\n".repeat(100)).unwrap();
    fs::write(src.join("a/two"), vec![7u8; 300_000]).unwrap();
    fs::write(src.join("b/plain"), b"plain\n").unwrap();
    fs::hard_link(src.join("a/one"), src.join("b/one-again")).unwrap();
    fs::hard_link(src.join("a/two"), src.join("a/two-b")).unwrap();
    fs::hard_link(src.join("a/two"), src.join("c/deep/two-c")).unwrap();
    let want = link_groups(&src);
    assert_eq!(want.len(), 2);

    // tar x of an archive with hard links, diff -r, links in the mount.
    let archive = work.path().join("links.tar");
    run(Command::new("tar")
        .arg("cf")
        .arg(&archive)
        .arg("-C")
        .arg(&src)
        .arg("."));
    let x = m.path("x");
    fs::create_dir(&x).unwrap();
    run(Command::new("tar")
        .arg("xf")
        .arg(&archive)
        .arg("-C")
        .arg(&x));
    run(Command::new("diff").arg("-r").arg(&src).arg(&x));
    assert_eq!(link_groups(&x), want, "tar x into the mount");

    // tar c from the mount records the links; extracted natively they are links again.
    let again = work.path().join("again.tar");
    run(Command::new("tar")
        .arg("cf")
        .arg(&again)
        .arg("-C")
        .arg(&x)
        .arg("."));
    let listing = run(Command::new("tar").arg("tvf").arg(&again)).stdout;
    assert_eq!(
        String::from_utf8_lossy(&listing)
            .matches(" link to ")
            .count(),
        3,
        "tar c from the mount stores the hard links as links"
    );
    let y = work.path().join("y");
    fs::create_dir(&y).unwrap();
    run(Command::new("tar").arg("xf").arg(&again).arg("-C").arg(&y));
    run(Command::new("diff").arg("-r").arg(&src).arg(&y));
    assert_eq!(link_groups(&y), want, "tar c out of the mount");

    // cp -al: a tree of links to the same inodes.
    run(Command::new("cp").arg("-al").arg(&x).arg(m.path("cpal")));
    run(Command::new("diff").arg("-r").arg(&src).arg(m.path("cpal")));
    {
        use std::os::unix::fs::MetadataExt;
        for rel in ["a/one", "a/two", "b/plain", "c/deep/two-c"] {
            let (p, q) = (
                fs::metadata(x.join(rel)).unwrap(),
                fs::metadata(m.path("cpal").join(rel)).unwrap(),
            );
            assert_eq!(p.ino(), q.ino(), "cp -al: {rel} is the same inode");
        }
        assert_eq!(fs::metadata(x.join("a/two")).unwrap().nlink(), 6);
        assert_eq!(fs::metadata(x.join("b/plain")).unwrap().nlink(), 2);
    }

    // rsync -aH into the mount and back out.
    if have("rsync") {
        let mut src_arg = src.as_os_str().to_owned();
        src_arg.push("/");
        run(Command::new("rsync")
            .arg("-aH")
            .arg(&src_arg)
            .arg(m.path("r")));
        assert_eq!(link_groups(&m.path("r")), want, "rsync -aH into the mount");
        let mut r_arg = m.path("r").into_os_string();
        r_arg.push("/");
        let back = work.path().join("back");
        run(Command::new("rsync").arg("-aH").arg(&r_arg).arg(&back));
        run(Command::new("diff").arg("-r").arg(&src).arg(&back));
        assert_eq!(link_groups(&back), want, "rsync -aH out of the mount");
    } else {
        eprintln!("rsync -aH part SKIPPED: `rsync` is not installed");
    }

    // git clone --local inside the mount hard-links the object files.
    if have("git") {
        let home = tempfile::tempdir().unwrap();
        let origin = m.path("origin");
        fs::create_dir(&origin).unwrap();
        git(&origin, home.path(), &["init", "-q"]);
        for i in 0..5 {
            fs::write(
                origin.join(format!("f{i}.txt")),
                format!("{i}\n").repeat(50),
            )
            .unwrap();
        }
        git(&origin, home.path(), &["add", "-A"]);
        git(&origin, home.path(), &["commit", "-q", "-m", "first"]);
        git(
            m.root(),
            home.path(),
            &["clone", "-q", "--local", "origin", "clone"],
        );
        let clone = m.path("clone");
        let status = git(&clone, home.path(), &["status", "--porcelain"]);
        assert!(status.stdout.is_empty(), "clean clone");
        git(&clone, home.path(), &["fsck", "--strict"]);
        let linked: Vec<Vec<String>> = link_groups(m.root())
            .into_iter()
            .filter(|g| g.iter().any(|n| n.starts_with("clone/.git/objects/")))
            .collect();
        assert!(
            !linked.is_empty(),
            "git clone --local hard-links objects into the clone"
        );
        let head = |d: &Path| git(d, home.path(), &["rev-parse", "HEAD"]).stdout;
        assert_eq!(head(&clone), head(&origin));
    }

    // Everything is still linked after the flush and a remount.
    m.remount();
    let all = link_groups(m.root());
    let two: Vec<String> = ["cpal", "x"]
        .iter()
        .flat_map(|t| ["a/two", "a/two-b", "c/deep/two-c"].map(|n| format!("{t}/{n}")))
        .collect();
    assert!(all.contains(&two), "after remount: {all:?}");
    run(Command::new("diff").arg("-r").arg(&src).arg(&x));
}

/// `cp -al` of a tree holding symlinks (one dangling) links them too: one inode, two names,
/// the same target; and `find` (which trusts a directory's `st_nlink`) sees every directory.
#[test]
fn cp_al_links_symlinks_and_find_sees_every_directory() {
    use std::os::unix::fs::MetadataExt;
    let m = TestMount::new();
    let t = m.path("t");
    fs::create_dir_all(t.join("sub/deeper")).unwrap();
    fs::create_dir(t.join("sub2")).unwrap();
    fs::write(t.join("f"), b"file\n").unwrap();
    std::os::unix::fs::symlink("f", t.join("s")).unwrap();
    std::os::unix::fs::symlink("nowhere", t.join("sub/dangling")).unwrap();
    run(Command::new("cp").arg("-al").arg(&t).arg(m.path("t2")));
    for rel in ["f", "s", "sub/dangling"] {
        let (p, q) = (
            fs::symlink_metadata(t.join(rel)).unwrap(),
            fs::symlink_metadata(m.path("t2").join(rel)).unwrap(),
        );
        assert_eq!((p.ino(), p.nlink()), (q.ino(), 2), "cp -al: {rel}");
    }
    assert_eq!(
        fs::read_link(m.path("t2/sub/dangling")).unwrap(),
        Path::new("nowhere")
    );
    run(Command::new("diff")
        .arg("-r")
        .arg("--no-dereference")
        .arg(&t)
        .arg(m.path("t2")));
    assert_eq!(fs::symlink_metadata(&t).unwrap().nlink(), 4);
    let out = run(Command::new("find").arg(m.path("t2")).arg("-type").arg("d")).stdout;
    assert_eq!(
        String::from_utf8_lossy(&out).lines().count(),
        4,
        "t2, sub, sub/deeper, sub2"
    );
}
