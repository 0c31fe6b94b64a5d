//! Randomized model test: a seeded sequence of filesystem operations applied in lockstep to
//! the mount under test and to a native directory (the model). After every step the results
//! (value or errno) must match; every 100 steps and at the end the whole trees must match.
//!
//! `CAIRN_MODEL_SEED` (default fixed) and `CAIRN_MODEL_OPS` (default 10000) control the run.
//! On a mismatch the seed, the failing step and the last 20 operations (`CAIRN_MODEL_HISTORY`)
//! are printed.

mod common;

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use common::*;

const DEFAULT_SEED: u64 = 0xCA1F_2024;
const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const DIRS: [&str; 3] = ["p", "q", "r"];
const MAX_FILE: u64 = 256 * 1024;
const SLOTS: usize = 4;
const XATTR_NAMES: [&str; 3] = ["user.x", "user.y", "user.long.attribute.name"];

#[derive(Clone, Debug)]
enum Op {
    /// open(O_WRONLY|O_CREAT [|O_TRUNC] [|O_EXCL] [|O_APPEND]) + pwrite + close.
    Write {
        path: String,
        off: u64,
        len: usize,
        seed: u64,
        trunc: bool,
        excl: bool,
        append: bool,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Read {
        path: String,
        off: u64,
        len: usize,
    },
    Stat {
        path: String,
    },
    Lstat {
        path: String,
    },
    Readdir {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Unlink {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Symlink {
        target: String,
        path: String,
    },
    Readlink {
        path: String,
    },
    /// link(2): `to` becomes another name of `from`'s inode.
    Link {
        from: String,
        to: String,
    },
    /// Whether two names stat to one inode (hard links).
    SameIno {
        a: String,
        b: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    SetXattr {
        path: String,
        name: String,
        len: usize,
        seed: u64,
        flags: i32,
    },
    GetXattr {
        path: String,
        name: String,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    ListXattr {
        path: String,
    },
    /// Open a file O_RDWR into a slot (held across later operations).
    OpenSlot {
        slot: usize,
        path: String,
        create: bool,
    },
    SlotWrite {
        slot: usize,
        off: u64,
        len: usize,
        seed: u64,
    },
    SlotRead {
        slot: usize,
        off: u64,
        len: usize,
    },
    SlotTruncate {
        slot: usize,
        len: u64,
    },
    SlotFstat {
        slot: usize,
    },
    /// fallocate mode 0 (may grow the file) or KEEP_SIZE (never changes what is seen).
    SlotFallocate {
        slot: usize,
        off: u64,
        len: u64,
        keep_size: bool,
    },
    SlotFsync {
        slot: usize,
    },
    CloseSlot {
        slot: usize,
    },
}

type Outcome = Result<String, i32>;

fn gen_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v[..]);
    v
}

/// One side of the lockstep: a root directory plus held file slots.
struct Side {
    root: PathBuf,
    slots: Vec<Option<File>>,
}

fn err(e: io::Error) -> i32 {
    errno_of(&e)
}

fn kind_of(md: &fs::Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    }
}

fn describe(md: &fs::Metadata) -> String {
    let kind = kind_of(md);
    // Directory sizes and link counts are filesystem-specific: left out.
    match kind {
        "dir" => format!("dir mode={:o}", md.mode() & 0o7777),
        "symlink" => format!("symlink size={}", md.len()),
        _ => format!(
            "{kind} mode={:o} size={} nlink={}",
            md.mode() & 0o7777,
            md.len(),
            md.nlink()
        ),
    }
}

impl Side {
    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Write {
                path,
                off,
                len,
                seed,
                trunc,
                excl,
                append,
            } => {
                let mut flags = libc::O_WRONLY | libc::O_CREAT;
                if *trunc {
                    flags |= libc::O_TRUNC;
                }
                if *excl {
                    flags |= libc::O_EXCL;
                }
                if *append {
                    flags |= libc::O_APPEND;
                }
                let f = open_raw(&self.p(path), flags, 0o644).map_err(err)?;
                let data = gen_bytes(*seed, *len);
                if *append {
                    use std::io::Write;
                    (&f).write_all(&data).map_err(err)?;
                } else {
                    f.write_all_at(&data, *off).map_err(err)?;
                }
                Ok(format!("size={}", f.metadata().map_err(err)?.len()))
            }
            Op::Truncate { path, len } => {
                let c = cpath(&self.p(path));
                if unsafe { libc::truncate(c.as_ptr(), *len as libc::off_t) } != 0 {
                    return Err(err(io::Error::last_os_error()));
                }
                Ok(String::new())
            }
            Op::Read { path, off, len } => {
                let f = File::open(self.p(path)).map_err(err)?;
                let mut buf = vec![0u8; *len];
                let mut got = 0;
                loop {
                    let n = f.read_at(&mut buf[got..], off + got as u64).map_err(err)?;
                    if n == 0 || got + n == buf.len() {
                        got += n;
                        break;
                    }
                    got += n;
                }
                Ok(format!(
                    "{} bytes {}",
                    got,
                    blake3::hash(&buf[..got]).to_hex()
                ))
            }
            Op::Stat { path } => fs::metadata(self.p(path))
                .map(|m| describe(&m))
                .map_err(err),
            Op::Lstat { path } => fs::symlink_metadata(self.p(path))
                .map(|m| describe(&m))
                .map_err(err),
            Op::Readdir { path } => {
                let mut names = Vec::new();
                for e in fs::read_dir(self.p(path)).map_err(err)? {
                    let e = e.map_err(err)?;
                    let t = e.file_type().map_err(err)?;
                    let k = if t.is_symlink() {
                        "l"
                    } else if t.is_dir() {
                        "d"
                    } else {
                        "f"
                    };
                    names.push(format!("{}:{k}", e.file_name().to_string_lossy()));
                }
                names.sort();
                Ok(names.join(","))
            }
            Op::Mkdir { path, mode } => {
                let c = cpath(&self.p(path));
                if unsafe { libc::mkdir(c.as_ptr(), *mode as libc::mode_t) } != 0 {
                    return Err(err(io::Error::last_os_error()));
                }
                Ok(String::new())
            }
            Op::Rmdir { path } => fs::remove_dir(self.p(path))
                .map(|_| String::new())
                .map_err(err),
            Op::Unlink { path } => fs::remove_file(self.p(path))
                .map(|_| String::new())
                .map_err(err),
            Op::Rename { from, to, flags } => renameat2(&self.p(from), &self.p(to), *flags)
                .map(|_| String::new())
                .map_err(err),
            Op::Symlink { target, path } => symlink(target, self.p(path))
                .map(|_| String::new())
                .map_err(err),
            Op::Link { from, to } => {
                // Hard links of symlinks are refused by cairn (README); not modelled.
                if fs::symlink_metadata(self.p(from)).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Ok("symlink: skipped".into());
                }
                fs::hard_link(self.p(from), self.p(to))
                    .map(|_| String::new())
                    .map_err(err)
            }
            Op::SameIno { a, b } => {
                let a = fs::symlink_metadata(self.p(a)).map_err(err)?;
                let b = fs::symlink_metadata(self.p(b)).map_err(err)?;
                Ok(if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
                    "same inode".into()
                } else {
                    "different inodes".into()
                })
            }
            Op::Readlink { path } => fs::read_link(self.p(path))
                .map(|t| t.to_string_lossy().into_owned())
                .map_err(err),
            Op::Chmod { path, mode } => {
                fs::set_permissions(self.p(path), fs::Permissions::from_mode(*mode))
                    .map(|_| String::new())
                    .map_err(err)
            }
            Op::SetXattr {
                path,
                name,
                len,
                seed,
                flags,
            } => setxattr(&self.p(path), name, &gen_bytes(*seed, *len), *flags)
                .map(|_| String::new())
                .map_err(err),
            Op::GetXattr { path, name } => getxattr(&self.p(path), name)
                .map(|v| blake3::hash(&v).to_hex().to_string())
                .map_err(err),
            Op::RemoveXattr { path, name } => removexattr(&self.p(path), name)
                .map(|_| String::new())
                .map_err(err),
            Op::ListXattr { path } => listxattr(&self.p(path))
                .map(|v| {
                    v.into_iter()
                        .filter(|n| n.starts_with("user."))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .map_err(err),
            Op::OpenSlot { slot, path, create } => {
                let f = File::options()
                    .read(true)
                    .write(true)
                    .create(*create)
                    .mode(0o644)
                    .open(self.p(path))
                    .map_err(err)?;
                self.slots[*slot] = Some(f);
                Ok(String::new())
            }
            Op::SlotWrite {
                slot,
                off,
                len,
                seed,
            } => {
                let f = self.slots[*slot].as_ref().expect("slot open");
                f.write_all_at(&gen_bytes(*seed, *len), *off).map_err(err)?;
                Ok(String::new())
            }
            Op::SlotRead { slot, off, len } => {
                let f = self.slots[*slot].as_ref().expect("slot open");
                let mut buf = vec![0u8; *len];
                let n = f.read_at(&mut buf, *off).map_err(err)?;
                Ok(format!("{n} bytes {}", blake3::hash(&buf[..n]).to_hex()))
            }
            Op::SlotTruncate { slot, len } => {
                let f = self.slots[*slot].as_ref().expect("slot open");
                f.set_len(*len).map(|_| String::new()).map_err(err)
            }
            Op::SlotFstat { slot } => {
                let f = self.slots[*slot].as_ref().expect("slot open");
                let md = f.metadata().map_err(err)?;
                // nlink is 0 once the name was unlinked or replaced (open-unlinked files).
                Ok(format!(
                    "{} mode={:o} size={} nlink={}",
                    kind_of(&md),
                    md.mode() & 0o7777,
                    md.len(),
                    md.nlink()
                ))
            }
            Op::SlotFallocate {
                slot,
                off,
                len,
                keep_size,
            } => {
                let f = self.slots[*slot].as_ref().expect("slot open");
                let mode = if *keep_size {
                    libc::FALLOC_FL_KEEP_SIZE
                } else {
                    0
                };
                let fd = std::os::fd::AsRawFd::as_raw_fd(f);
                // SAFETY: fallocate on a descriptor the slot keeps open.
                match unsafe { libc::fallocate(fd, mode, *off as i64, *len as i64) } {
                    0 => Ok(format!("size={}", f.metadata().map_err(err)?.len())),
                    _ => Err(err(io::Error::last_os_error())),
                }
            }
            Op::SlotFsync { slot } => {
                let f = self.slots[*slot].as_ref().expect("slot open");
                f.sync_all().map(|_| String::new()).map_err(err)
            }
            Op::CloseSlot { slot } => {
                self.slots[*slot] = None;
                Ok(String::new())
            }
        }
    }
}

struct Gen {
    rng: StdRng,
    open: [bool; SLOTS],
}

impl Gen {
    fn name(&mut self) -> &'static str {
        if self.rng.random_bool(0.4) {
            DIRS[self.rng.random_range(0..DIRS.len())]
        } else {
            NAMES[self.rng.random_range(0..NAMES.len())]
        }
    }

    /// A path of depth 1 or 2 (a `p/q` style nesting makes ENOTDIR/ENOENT frequent).
    fn path(&mut self) -> String {
        if self.rng.random_bool(0.45) {
            self.name().to_string()
        } else {
            let d = DIRS[self.rng.random_range(0..DIRS.len())];
            let d = if self.rng.random_bool(0.1) {
                NAMES[0]
            } else {
                d
            };
            format!("{d}/{}", self.name())
        }
    }

    /// A path whose last component is usually a file name (`a`..`f`).
    fn file_path(&mut self) -> String {
        let mut p = self.path();
        if self.rng.random_bool(0.85) {
            let cut = p.rfind('/').map(|i| i + 1).unwrap_or(0);
            p.truncate(cut);
            p += NAMES[self.rng.random_range(0..NAMES.len())];
        }
        p
    }

    /// A path whose last component is usually a directory name (`p`, `q`, `r`).
    fn subdir_path(&mut self) -> String {
        let mut p = self.path();
        if self.rng.random_bool(0.85) {
            let cut = p.rfind('/').map(|i| i + 1).unwrap_or(0);
            p.truncate(cut);
            p += DIRS[self.rng.random_range(0..DIRS.len())];
        }
        p
    }

    fn dir_path(&mut self) -> String {
        match self.rng.random_range(0..5) {
            0 => String::new(), // the root
            1 | 2 => DIRS[self.rng.random_range(0..DIRS.len())].to_string(),
            _ => self.path(),
        }
    }

    /// Symlink targets never escape the tree wherever the link is later renamed to: they
    /// are relative, without `..` (a `../x` target would point outside the root once the
    /// link moves up a level), and never absolute.
    fn link_target(&mut self, link_path: &str) -> String {
        match self.rng.random_range(0..6) {
            0 => format!(
                "{}/{}",
                DIRS[self.rng.random_range(0..DIRS.len())],
                self.name()
            ),
            1 => "dangling-target".to_string(),
            2 => link_path.rsplit('/').next().unwrap().to_string(), // self-loop
            _ => self.name().to_string(),
        }
    }

    fn offset(&mut self) -> u64 {
        match self.rng.random_range(0..4) {
            0 => 0,
            1 => self.rng.random_range(0..4096),
            _ => self.rng.random_range(0..MAX_FILE - 65536),
        }
    }

    fn len(&mut self) -> usize {
        match self.rng.random_range(0..4) {
            0 => self.rng.random_range(0..16),
            1 | 2 => self.rng.random_range(0..8192),
            _ => self.rng.random_range(0..65536),
        }
    }

    fn mode(&mut self) -> u32 {
        [0o644, 0o600, 0o755, 0o700, 0o640, 0o444, 0o2755, 0o1777][self.rng.random_range(0..8)]
    }

    fn open_slot(&mut self) -> Option<usize> {
        let open: Vec<usize> = (0..SLOTS).filter(|i| self.open[*i]).collect();
        if open.is_empty() {
            None
        } else {
            Some(open[self.rng.random_range(0..open.len())])
        }
    }

    fn next(&mut self) -> Op {
        loop {
            let seed = self.rng.random();
            let op = match self.rng.random_range(0..100) {
                0..=17 => Op::Write {
                    path: self.file_path(),
                    off: self.offset(),
                    len: self.len(),
                    seed,
                    trunc: self.rng.random_bool(0.2),
                    excl: self.rng.random_bool(0.1),
                    append: self.rng.random_bool(0.1),
                },
                18..=21 => Op::Truncate {
                    path: self.file_path(),
                    len: self.rng.random_range(0..MAX_FILE),
                },
                22..=27 => Op::Read {
                    path: self.file_path(),
                    off: self.offset(),
                    len: self.len(),
                },
                28..=30 => Op::Stat { path: self.path() },
                31..=32 => Op::Lstat { path: self.path() },
                33..=34 => Op::Readdir {
                    path: self.dir_path(),
                },
                35 => Op::Link {
                    from: self.path(),
                    to: self.file_path(),
                },
                36 => Op::SameIno {
                    a: self.file_path(),
                    b: self.file_path(),
                },
                37..=43 => Op::Mkdir {
                    path: self.subdir_path(),
                    mode: 0o755,
                },
                44..=47 => Op::Rmdir {
                    path: self.subdir_path(),
                },
                48..=53 => Op::Unlink {
                    path: self.file_path(),
                },
                54..=62 => {
                    let flags = match self.rng.random_range(0..10) {
                        0 => libc::RENAME_NOREPLACE,
                        1 => libc::RENAME_EXCHANGE,
                        _ => 0,
                    };
                    Op::Rename {
                        from: self.path(),
                        to: self.path(),
                        flags,
                    }
                }
                63..=65 => {
                    let path = self.file_path();
                    Op::Symlink {
                        target: self.link_target(&path),
                        path,
                    }
                }
                66 => Op::Readlink {
                    path: self.file_path(),
                },
                67..=69 => Op::Chmod {
                    path: self.path(),
                    mode: self.mode(),
                },
                70..=73 => Op::SetXattr {
                    path: self.path(),
                    name: XATTR_NAMES[self.rng.random_range(0..XATTR_NAMES.len())].into(),
                    len: self.rng.random_range(0..300),
                    seed,
                    flags: [0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]
                        [self.rng.random_range(0..4)],
                },
                74 => Op::GetXattr {
                    path: self.path(),
                    name: XATTR_NAMES[self.rng.random_range(0..XATTR_NAMES.len())].into(),
                },
                75..=76 => Op::RemoveXattr {
                    path: self.path(),
                    name: XATTR_NAMES[self.rng.random_range(0..XATTR_NAMES.len())].into(),
                },
                77 => Op::ListXattr { path: self.path() },
                78..=81 => {
                    let slot = self.rng.random_range(0..SLOTS);
                    if self.open[slot] {
                        continue;
                    }
                    Op::OpenSlot {
                        slot,
                        path: self.file_path(),
                        create: self.rng.random_bool(0.5),
                    }
                }
                82..=88 => {
                    let Some(slot) = self.open_slot() else {
                        continue;
                    };
                    Op::SlotWrite {
                        slot,
                        off: self.offset(),
                        len: self.len(),
                        seed,
                    }
                }
                89..=91 => {
                    let Some(slot) = self.open_slot() else {
                        continue;
                    };
                    Op::SlotRead {
                        slot,
                        off: self.offset(),
                        len: self.len(),
                    }
                }
                92 => {
                    let Some(slot) = self.open_slot() else {
                        continue;
                    };
                    Op::SlotTruncate {
                        slot,
                        len: self.rng.random_range(0..MAX_FILE),
                    }
                }
                93..=94 => {
                    let Some(slot) = self.open_slot() else {
                        continue;
                    };
                    Op::SlotFstat { slot }
                }
                95 => {
                    let Some(slot) = self.open_slot() else {
                        continue;
                    };
                    if self.rng.random_bool(0.5) {
                        Op::SlotFsync { slot }
                    } else {
                        Op::SlotFallocate {
                            slot,
                            off: self.offset(),
                            len: self.rng.random_range(1..64 * 1024),
                            keep_size: self.rng.random_bool(0.5),
                        }
                    }
                }
                _ => {
                    let Some(slot) = self.open_slot() else {
                        continue;
                    };
                    Op::CloseSlot { slot }
                }
            };
            return op;
        }
    }
}

/// Mode tweak applied after generation: chmod of a directory keeps u+rwx so a non-root run
/// of the suite can still walk the tree (root ignores mode bits anyway).
fn fix_chmod(op: &mut Op, model_root: &Path) {
    if let Op::Chmod { path, mode } = op
        && fs::metadata(model_root.join(&*path))
            .map(|m| m.is_dir())
            .unwrap_or(false)
    {
        *mode |= 0o700;
    }
}

struct Run {
    seed: u64,
    step: usize,
    history: VecDeque<(usize, Op, Outcome)>,
    gen_: Gen,
    mount: Side,
    model: Side,
    /// (operation kind, outcome class) → count, printed at the end so a degenerate run
    /// (say, everything failing with ENOENT) is easy to spot.
    stats: std::collections::BTreeMap<String, usize>,
    max_entries: usize,
}

impl Run {
    fn new(seed: u64, mount_root: &Path, model_root: &Path) -> Run {
        Run {
            seed,
            step: 0,
            history: VecDeque::new(),
            gen_: Gen {
                rng: StdRng::seed_from_u64(seed),
                open: [false; SLOTS],
            },
            mount: Side {
                root: mount_root.to_path_buf(),
                slots: (0..SLOTS).map(|_| None).collect(),
            },
            model: Side {
                root: model_root.to_path_buf(),
                slots: (0..SLOTS).map(|_| None).collect(),
            },
            stats: Default::default(),
            max_entries: 0,
        }
    }

    fn context(&self) -> String {
        let mut s = format!(
            "model test seed={} (rerun: CAIRN_MODEL_SEED={}) step={}\nlast operations:\n",
            self.seed, self.seed, self.step
        );
        for (i, op, out) in &self.history {
            s += &format!("  #{i}: {op:?} -> {}\n", fmt_outcome(out));
        }
        s
    }

    fn step(&mut self) {
        let mut op = self.gen_.next();
        fix_chmod(&mut op, &self.model.root);
        let want = self.model.apply(&op);
        let got = self.mount.apply(&op);
        match &op {
            Op::OpenSlot { slot, .. } if want.is_ok() => self.gen_.open[*slot] = true,
            Op::CloseSlot { slot } => self.gen_.open[*slot] = false,
            _ => {}
        }
        self.history
            .push_back((self.step, op.clone(), want.clone()));
        if self.history.len() > history_len() {
            self.history.pop_front();
        }
        let kind = format!("{op:?}");
        let kind = kind.split([' ', '{']).next().unwrap_or("").to_string();
        let class = match &want {
            Ok(_) => "ok".to_string(),
            Err(e) => errno_name(*e),
        };
        *self.stats.entry(format!("{kind} {class}")).or_default() += 1;
        if want != got {
            panic!(
                "{}\nMISMATCH at step {}: {op:?}\n  model (native): {}\n  mount         : {}",
                self.context(),
                self.step,
                fmt_outcome(&want),
                fmt_outcome(&got)
            );
        }
        self.step += 1;
    }

    fn compare_trees(&mut self, what: &str) {
        let a = snapshot(&self.model.root);
        let b = try_snapshot(&self.mount.root)
            .unwrap_or_else(|e| panic!("{}\n{what}: mount snapshot: {e}", self.context()));
        self.max_entries = self.max_entries.max(a.len());
        if a != b {
            eprintln!("{}", self.context());
            assert_snapshots_eq(&a, &b, &format!("{what} (left = model, right = mount)"));
        }
    }

    fn close_all(&mut self) {
        for s in 0..SLOTS {
            self.mount.slots[s] = None;
            self.model.slots[s] = None;
            self.gen_.open[s] = false;
        }
    }

    fn print_stats(&self) {
        let mut s = format!("outcomes (largest tree: {} entries):\n", self.max_entries);
        for (k, n) in &self.stats {
            s += &format!("  {k}: {n}\n");
        }
        eprintln!("{s}");
    }

    fn run(&mut self, ops: usize) {
        for _ in 0..ops {
            self.step();
            if self.step.is_multiple_of(100) {
                self.compare_trees(&format!("tree after step {}", self.step));
            }
        }
        self.compare_trees(&format!("final tree after step {}", self.step));
    }
}

fn fmt_outcome(o: &Outcome) -> String {
    match o {
        Ok(s) => format!("Ok({s})"),
        Err(e) => format!("Err({})", errno_name(*e)),
    }
}

fn seed() -> u64 {
    match std::env::var("CAIRN_MODEL_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("CAIRN_MODEL_SEED={s:?} is not a u64"))
        }
        Err(_) => DEFAULT_SEED,
    }
}

/// How many past operations a mismatch report shows (`CAIRN_MODEL_HISTORY`, default 20).
fn history_len() -> usize {
    std::env::var("CAIRN_MODEL_HISTORY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

fn ops() -> usize {
    std::env::var("CAIRN_MODEL_OPS")
        .ok()
        .map(|s| s.parse().expect("CAIRN_MODEL_OPS must be a number"))
        .unwrap_or(10_000)
}

#[test]
fn model_lockstep() {
    let m = TestMount::new();
    let model = tempfile::tempdir().unwrap();
    let seed = seed();
    let n = ops();
    eprintln!("fs_model: seed={seed} ops={n} target={:?}", m.target());
    let started = std::time::Instant::now();
    let mut run = Run::new(seed, m.root(), model.path());
    run.run(n);
    run.close_all();
    run.compare_trees("after closing every handle");
    run.print_stats();
    eprintln!("fs_model: {n} ops matched in {:?}", started.elapsed());
}

#[test]
fn model_lockstep_with_remount() {
    let mut m = TestMount::new();
    let model = tempfile::tempdir().unwrap();
    let seed = seed() ^ 0x5EED_0F2E_0000;
    let n = ops() / 2;
    eprintln!(
        "fs_model (remount): seed={seed} ops={n}x2 target={:?}",
        m.target()
    );
    let mut run = Run::new(seed, m.root(), model.path());
    run.run(n);
    // Handles do not survive a remount; close them on both sides first.
    run.close_all();
    m.remount();
    run.compare_trees("tree right after remount");
    run.run(n);
    run.close_all();
    m.remount();
    run.compare_trees("tree after the second remount");
}

/// Hard links, checked name by name (the lockstep run above covers them at random): one
/// inode for every name, `st_nlink`, writes visible through every name (also through an
/// open handle), unlink and rename of one name, rename over a link, links across
/// directories, ctime, and all of it again after a remount (the links went through a
/// flush into the snapshot and came back as links).
#[test]
fn hard_links() {
    let mut m = TestMount::new();
    let root = m.root().to_path_buf();
    let id = |p: &str| {
        let md = fs::symlink_metadata(root.join(p)).unwrap_or_else(|e| panic!("lstat {p}: {e}"));
        (md.ino(), md.nlink())
    };
    fs::create_dir(m.path("d1")).unwrap();
    fs::create_dir(m.path("d2")).unwrap();
    fs::write(m.path("d1/a"), b"first").unwrap();
    let before = fs::metadata(m.path("d1/a")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::hard_link(m.path("d1/a"), m.path("d2/b")).unwrap();
    fs::hard_link(m.path("d2/b"), m.path("c")).unwrap();
    let (ino, n) = id("d1/a");
    assert_eq!(n, 3, "st_nlink after two links");
    assert_eq!(id("d2/b"), (ino, 3));
    assert_eq!(id("c"), (ino, 3));
    let after = fs::metadata(m.path("c")).unwrap();
    assert!(
        (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
        "link(2) moves the inode's ctime"
    );
    assert_eq!(after.mtime(), before.mtime(), "link(2) keeps the mtime");

    // A write through one name shows through the others, also through an open handle.
    let held = File::options()
        .read(true)
        .write(true)
        .open(m.path("c"))
        .unwrap();
    fs::write(m.path("d2/b"), b"second").unwrap();
    assert_eq!(fs::read(m.path("d1/a")).unwrap(), b"second");
    let mut buf = [0u8; 6];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"second");
    held.write_all_at(b"THIRD!", 0).unwrap();
    assert_eq!(fs::read(m.path("d2/b")).unwrap(), b"THIRD!");
    fs::set_permissions(m.path("d1/a"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(m.path("c")).unwrap().mode() & 0o7777, 0o600);

    // Unlink one name: the others keep the inode and the content.
    fs::remove_file(m.path("d1/a")).unwrap();
    assert_eq!(id("c"), (ino, 2));
    assert_eq!(
        held.metadata().unwrap().nlink(),
        2,
        "fstat of the open inode"
    );
    drop(held);
    // Rename a name, then rename another file over a name.
    fs::rename(m.path("c"), m.path("d1/renamed")).unwrap();
    assert_eq!(id("d1/renamed"), (ino, 2));
    assert_eq!(id("d2/b"), (ino, 2));
    fs::write(m.path("other"), b"other").unwrap();
    fs::rename(m.path("other"), m.path("d2/b")).unwrap();
    assert_eq!(
        id("d1/renamed").1,
        1,
        "the link replaced by a rename is gone"
    );
    assert_eq!(fs::read(m.path("d1/renamed")).unwrap(), b"THIRD!");
    assert_eq!(fs::read(m.path("d2/b")).unwrap(), b"other");
    // rename(2) between two names of one inode does nothing.
    fs::hard_link(m.path("d1/renamed"), m.path("d2/x")).unwrap();
    fs::rename(m.path("d1/renamed"), m.path("d2/x")).unwrap();
    assert_eq!(id("d1/renamed").1, 2);
    // A directory rename keeps the links inside it.
    fs::rename(m.path("d2"), m.path("d3")).unwrap();
    let (ino2, n2) = id("d3/x");
    assert_eq!((id("d1/renamed"), n2), ((ino2, 2), 2));
    // Directories cannot be linked; symlinks can, and FIFOs too (on this device).
    let e = fs::hard_link(m.path("d1"), m.path("dirlink")).unwrap_err();
    assert_eq!(errno_of(&e), libc::EPERM);
    symlink("d1", m.path("sl")).unwrap();
    fs::hard_link(m.path("sl"), m.path("d1/sl2")).unwrap();
    let lid = |rel: &str| {
        let md = fs::symlink_metadata(m.path(rel)).unwrap();
        assert!(md.file_type().is_symlink(), "{rel}");
        (md.ino(), md.nlink())
    };
    let (sino, snl) = lid("sl");
    assert_eq!((snl, lid("d1/sl2")), (2, (sino, 2)));
    assert_eq!(fs::read_link(m.path("d1/sl2")).unwrap(), Path::new("d1"));
    fs::hard_link(m.path("sl"), m.path("sl3")).unwrap();
    fs::remove_file(m.path("sl")).unwrap();
    assert_eq!((lid("d1/sl2").1, lid("sl3").1), (2, 2));
    let fifo = cpath(&m.path("fifo"));
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    fs::hard_link(m.path("fifo"), m.path("d1/fifo2")).unwrap();
    let (fino, fnl) = id("fifo");
    assert_eq!((fnl, id("d1/fifo2")), (2, (fino, 2)));
    fs::remove_file(m.path("fifo")).unwrap();
    assert_eq!(id("d1/fifo2").1, 1);

    // Everything survives the flush into the snapshot and a remount.
    m.remount();
    let (a, n) = id("d1/renamed");
    assert_eq!(n, 2, "st_nlink after remount");
    assert_eq!(id("d3/x"), (a, 2), "one inode after remount");
    let (p, q) = (
        fs::symlink_metadata(m.path("d1/sl2")).unwrap(),
        fs::symlink_metadata(m.path("sl3")).unwrap(),
    );
    assert_eq!(
        (p.ino(), p.nlink()),
        (q.ino(), 2),
        "symlink names after remount"
    );
    fs::write(m.path("d3/x"), b"after remount").unwrap();
    assert_eq!(fs::read(m.path("d1/renamed")).unwrap(), b"after remount");
    fs::remove_file(m.path("d3/x")).unwrap();
    assert_eq!(id("d1/renamed").1, 1);
    m.remount();
    assert_eq!(id("d1/renamed").1, 1);
    assert_eq!(fs::read(m.path("d1/renamed")).unwrap(), b"after remount");
}
