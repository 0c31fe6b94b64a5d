//! POSIX behaviour through a real kernel mount of `CairnFs` over `MemBase`.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};

use cairn_fuse::MemBase;
use common::*;

fn base_fixture() -> MemBase {
    let base = MemBase::new();
    base.insert_file("hello.txt", b"hello world", 0o644);
    base.insert_file("docs/a.md", b"# a", 0o644);
    base.insert_file("docs/b.md", b"# b", 0o600);
    base.insert_file("docs/sub/c.md", b"# c", 0o644);
    base.insert_dir("empty", 0o755);
    base.insert_symlink("link", b"hello.txt");
    base
}

#[test]
fn create_write_read_stat() {
    let m = Mounted::new(MemBase::new());
    let p = m.p("new.txt");
    fs::write(&p, b"abc").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"abc");
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), 3);
    assert!(md.is_file());
    assert_eq!(md.nlink(), 1);
    // SAFETY: trivial libc getters.
    assert_eq!(md.uid(), unsafe { libc::geteuid() });
    assert_eq!(md.gid(), unsafe { libc::getegid() });

    // Writes at any offset; the gap reads as zeros.
    let mut f = OpenOptions::new().write(true).open(&p).unwrap();
    f.seek(SeekFrom::Start(10)).unwrap();
    f.write_all(b"xyz").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"abc\0\0\0\0\0\0\0xyz");

    // O_APPEND always writes at the end.
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"!").unwrap();
    drop(f);
    assert_eq!(fs::read(&p).unwrap().len(), 14);

    // Truncate shrink and grow (ftruncate through a handle, truncate by path).
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(2).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 2);
    drop(f);
    let c = cstr(&p);
    // SAFETY: valid C string.
    check(unsafe { libc::truncate(c.as_ptr(), 5) }).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"ab\0\0\0");

    // O_TRUNC.
    fs::write(&p, b"fresh").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"fresh");

    // O_EXCL on an existing file.
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(errno(e), libc::EEXIST);

    // Creation mode honours the requested bits.
    let q = m.p("mode.sh");
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o750)
        .open(&q)
        .unwrap();
    let mode = fs::metadata(&q).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & !0o022, 0o750 & !0o022);
}

#[test]
fn big_write_read_roundtrip_with_offsets() {
    let m = Mounted::new(MemBase::new());
    let p = m.p("big.bin");
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(&p, &data).unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    let mut f = File::open(&p).unwrap();
    f.seek(SeekFrom::Start(3_333_333)).unwrap();
    let mut buf = vec![0; 1000];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data[3_333_333..3_334_333]);
    m.flush();
    assert_eq!(m.base.file_content("big.bin").unwrap(), data);
}

#[test]
fn base_entries_are_visible_with_their_metadata() {
    let m = Mounted::new(base_fixture());
    assert_eq!(fs::read(m.p("hello.txt")).unwrap(), b"hello world");
    assert_eq!(fs::read(m.p("docs/sub/c.md")).unwrap(), b"# c");
    let md = fs::metadata(m.p("docs/b.md")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    assert_eq!(md.mtime(), 1_600_000_000);
    assert!(fs::metadata(m.p("empty")).unwrap().is_dir());
    assert_eq!(
        fs::read_link(m.p("link")).unwrap().to_str().unwrap(),
        "hello.txt"
    );
    assert_eq!(fs::read(m.p("link")).unwrap(), b"hello world");
    assert_eq!(errno(fs::metadata(m.p("nope")).unwrap_err()), libc::ENOENT);
    assert_eq!(
        errno(fs::metadata(m.p("hello.txt/x")).unwrap_err()),
        libc::ENOTDIR
    );
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn readdir_merges_layers_and_hides_deletions() {
    let m = Mounted::new(base_fixture());
    fs::write(m.p("docs/new.md"), b"n").unwrap();
    fs::remove_file(m.p("docs/a.md")).unwrap();
    assert_eq!(names(&m.p("docs")), ["b.md", "new.md", "sub"]);
    assert_eq!(names(&m.mnt), ["docs", "empty", "hello.txt", "link"]);
    // Kinds come through readdir too.
    let kinds: Vec<(String, bool)> = fs::read_dir(m.p("docs"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.file_type().unwrap().is_dir(),
            )
        })
        .collect();
    assert!(kinds.contains(&("sub".to_string(), true)));
    assert!(kinds.contains(&("b.md".to_string(), false)));

    // A directory larger than one readdir buffer, with stable offsets.
    fs::create_dir(m.p("many")).unwrap();
    for i in 0..1500 {
        File::create(m.p(&format!("many/file-with-a-longish-name-{i:05}"))).unwrap();
    }
    let listed = names(&m.p("many"));
    assert_eq!(listed.len(), 1500);
    assert_eq!(listed[0], "file-with-a-longish-name-00000");
    // Inode numbers from readdir match stat.
    for e in fs::read_dir(m.p("docs")).unwrap() {
        let e = e.unwrap();
        assert_eq!(e.ino(), fs::symlink_metadata(e.path()).unwrap().ino());
    }
}

use std::os::unix::fs::DirEntryExt;

#[test]
fn mkdir_rmdir_errnos() {
    let m = Mounted::new(base_fixture());
    fs::create_dir(m.p("d")).unwrap();
    assert!(fs::metadata(m.p("d")).unwrap().is_dir());
    assert_eq!(errno(fs::create_dir(m.p("d")).unwrap_err()), libc::EEXIST);
    assert_eq!(
        errno(fs::create_dir(m.p("hello.txt")).unwrap_err()),
        libc::EEXIST
    );
    assert_eq!(
        errno(fs::create_dir(m.p("nope/x")).unwrap_err()),
        libc::ENOENT
    );
    // Not empty because of a base child, then because of an overlay child.
    assert_eq!(
        errno(fs::remove_dir(m.p("docs/sub")).unwrap_err()),
        libc::ENOTEMPTY
    );
    fs::remove_file(m.p("docs/sub/c.md")).unwrap();
    fs::remove_dir(m.p("docs/sub")).unwrap();
    fs::write(m.p("d/x"), b"").unwrap();
    assert_eq!(
        errno(fs::remove_dir(m.p("d")).unwrap_err()),
        libc::ENOTEMPTY
    );
    fs::remove_file(m.p("d/x")).unwrap();
    fs::remove_dir(m.p("d")).unwrap();
    assert_eq!(
        errno(fs::remove_dir(m.p("hello.txt")).unwrap_err()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs::remove_file(m.p("empty")).unwrap_err()),
        libc::EISDIR
    );
    assert_eq!(errno(fs::remove_dir(m.p("d")).unwrap_err()), libc::ENOENT);
    fs::remove_dir(m.p("empty")).unwrap();
    // Recreating a deleted base directory gives an empty directory.
    fs::create_dir(m.p("docs/sub")).unwrap();
    assert!(names(&m.p("docs/sub")).is_empty());
    m.flush();
    assert!(m.base.entry("empty").is_none());
    assert!(m.base.entry("docs/sub/c.md").is_none());
    assert!(m.base.entry("docs/sub").is_some());
}

#[test]
fn copy_on_write_leaves_base_untouched_until_flush() {
    let mut m = Mounted::new(base_fixture());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("hello.txt"))
        .unwrap();
    f.write_all(b"HELLO").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "HELLO world");
    drop(f);
    assert_eq!(m.base.file_content("hello.txt").unwrap(), b"hello world");
    m.flush();
    assert_eq!(m.base.file_content("hello.txt").unwrap(), b"HELLO world");
    assert_eq!(fs::read(m.p("hello.txt")).unwrap(), b"HELLO world");

    // O_TRUNC of a base file does not need its old content.
    fs::write(m.p("docs/a.md"), b"replaced").unwrap();
    assert_eq!(m.base.file_content("docs/a.md").unwrap(), b"# a");
    m.unmount().unwrap();
    assert_eq!(m.base.file_content("docs/a.md").unwrap(), b"replaced");
    assert!(Overlay::open(&m.overlay_dir).unwrap().is_empty().unwrap());
    assert_eq!(
        fs::read_dir(m.overlay_dir.join("staging")).unwrap().count(),
        0,
        "flushed staging files are deleted"
    );
}

use cairn_fuse::Overlay;

#[test]
fn unlinked_open_file_stays_usable() {
    let m = Mounted::new(base_fixture());
    fs::write(m.p("tmp.txt"), b"data").unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("tmp.txt"))
        .unwrap();
    fs::remove_file(m.p("tmp.txt")).unwrap();
    assert_eq!(
        errno(fs::metadata(m.p("tmp.txt")).unwrap_err()),
        libc::ENOENT
    );
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"+more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "data+more");
    assert_eq!(f.metadata().unwrap().len(), 9);

    // Same for a base file that was never copied.
    let mut g = File::open(m.p("docs/a.md")).unwrap();
    fs::remove_file(m.p("docs/a.md")).unwrap();
    let mut s = String::new();
    g.read_to_string(&mut s).unwrap();
    assert_eq!(s, "# a");
    drop((f, g));
    m.flush();
    assert!(m.base.entry("docs/a.md").is_none());
    assert!(m.base.entry("tmp.txt").is_none());
}

#[test]
fn rename_semantics() {
    let m = Mounted::new(base_fixture());
    // File over an existing file; the open handle of the replaced file keeps its content.
    fs::write(m.p("x.txt"), b"x").unwrap();
    let mut old = File::open(m.p("hello.txt")).unwrap();
    fs::rename(m.p("x.txt"), m.p("hello.txt")).unwrap();
    assert_eq!(fs::read(m.p("hello.txt")).unwrap(), b"x");
    assert!(!m.p("x.txt").exists());
    let mut s = String::new();
    old.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello world");

    // Across directories, keeping the inode number and an open handle.
    let ino = fs::metadata(m.p("docs/b.md")).unwrap().ino();
    let mut h = File::open(m.p("docs/b.md")).unwrap();
    fs::rename(m.p("docs/b.md"), m.p("empty/b2.md")).unwrap();
    assert_eq!(fs::metadata(m.p("empty/b2.md")).unwrap().ino(), ino);
    assert_eq!(
        fs::metadata(m.p("empty/b2.md"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let mut s = String::new();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "# b");

    // A directory with base and overlay descendants.
    fs::write(m.p("docs/sub/new.md"), b"new").unwrap();
    fs::rename(m.p("docs"), m.p("moved")).unwrap();
    assert!(!m.p("docs").exists());
    assert_eq!(names(&m.p("moved")), ["a.md", "sub"]);
    assert_eq!(names(&m.p("moved/sub")), ["c.md", "new.md"]);
    assert_eq!(fs::read(m.p("moved/sub/c.md")).unwrap(), b"# c");
    assert_eq!(fs::read(m.p("moved/sub/new.md")).unwrap(), b"new");
    // The old name can be reused without the moved children showing up.
    fs::create_dir(m.p("docs")).unwrap();
    assert!(names(&m.p("docs")).is_empty());

    // Errors.
    fs::create_dir(m.p("d1")).unwrap();
    fs::write(m.p("d1/f"), b"").unwrap();
    fs::create_dir(m.p("d2")).unwrap();
    assert_eq!(
        errno(fs::rename(m.p("moved"), m.p("moved/sub/inside")).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs::rename(m.p("d1"), m.p("hello.txt")).unwrap_err()),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs::rename(m.p("hello.txt"), m.p("d2")).unwrap_err()),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs::rename(m.p("d2"), m.p("d1")).unwrap_err()),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(fs::rename(m.p("nope"), m.p("d3")).unwrap_err()),
        libc::ENOENT
    );
    // Directory over an empty directory.
    fs::rename(m.p("d1"), m.p("d2")).unwrap();
    assert_eq!(names(&m.p("d2")), ["f"]);

    // renameat2 flags.
    fs::write(m.p("p"), b"P").unwrap();
    fs::write(m.p("q"), b"Q").unwrap();
    assert_eq!(
        renameat2(&m.p("p"), &m.p("q"), libc::RENAME_NOREPLACE),
        Err(libc::EEXIST)
    );
    renameat2(&m.p("p"), &m.p("fresh"), libc::RENAME_NOREPLACE).unwrap();
    renameat2(&m.p("fresh"), &m.p("q"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.p("q")).unwrap(), b"P");
    assert_eq!(fs::read(m.p("fresh")).unwrap(), b"Q");
    renameat2(&m.p("moved"), &m.p("fresh"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(m.p("moved")).unwrap(), b"Q");
    assert_eq!(fs::read(m.p("fresh/sub/c.md")).unwrap(), b"# c");
    assert_eq!(
        renameat2(&m.p("q"), &m.p("absent"), libc::RENAME_EXCHANGE),
        Err(libc::ENOENT)
    );

    // After a flush the base holds exactly the merged view.
    m.flush();
    assert_eq!(m.base.file_content("fresh/sub/c.md").unwrap(), b"# c");
    assert_eq!(m.base.file_content("fresh/a.md").unwrap(), b"# a");
    assert_eq!(m.base.file_content("empty/b2.md").unwrap(), b"# b");
    assert_eq!(m.base.file_content("hello.txt").unwrap(), b"x");
    assert!(m.base.entry("docs/a.md").is_none());
    assert!(m.base.entry("docs").is_some());
    assert_eq!(fs::read(m.p("fresh/sub/new.md")).unwrap(), b"new");
}

#[test]
fn symlink_link_and_name_limits() {
    let m = Mounted::new(base_fixture());
    std::os::unix::fs::symlink("docs/a.md", m.p("l2")).unwrap();
    assert_eq!(
        fs::read_link(m.p("l2")).unwrap().to_str().unwrap(),
        "docs/a.md"
    );
    assert_eq!(fs::read(m.p("l2")).unwrap(), b"# a");
    assert!(
        fs::symlink_metadata(m.p("l2"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // A hard link of a base file is one inode with two names, in the mount and, after
    // the flush, in the base: both entries carry the same link group.
    fs::hard_link(m.p("hello.txt"), m.p("docs/hard")).unwrap();
    let (a, b) = (
        fs::metadata(m.p("hello.txt")).unwrap(),
        fs::metadata(m.p("docs/hard")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    // Directories are not linked (symlinks are: see symlinks_can_be_hard_linked).
    assert_eq!(
        errno(fs::hard_link(m.p("docs"), m.p("hard-docs")).unwrap_err()),
        libc::EPERM
    );
    let long = "n".repeat(256);
    assert_eq!(
        errno(File::create(m.p(&long)).unwrap_err()),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs::create_dir(m.p(&long)).unwrap_err()),
        libc::ENAMETOOLONG
    );
    File::create(m.p(&"n".repeat(255))).unwrap();
    m.flush();
    assert_eq!(m.base.entry("l2").unwrap().target, b"docs/a.md");
    let group = |p: &str| cairn_overlay::LinkGroup::of(&m.base.entry(p).unwrap().xattrs);
    let g = group("hello.txt").expect("the flushed name carries its link group");
    assert_eq!(
        g.names,
        vec!["docs/hard".to_string(), "hello.txt".to_string()]
    );
    assert_eq!(group("docs/hard"), Some(g));
    assert_eq!(
        m.base.file_content("docs/hard"),
        m.base.file_content("hello.txt")
    );
    // No program sees the reserved attribute.
    let path =
        std::ffi::CString::new(m.p("hello.txt").into_os_string().into_encoded_bytes()).unwrap();
    let mut names = vec![0u8; 4096];
    // SAFETY: listxattr writes at most `names.len()` bytes into the buffer.
    let n = unsafe { libc::listxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0);
    assert!(!names[..n as usize].windows(10).any(|w| w == b"cairn.link"));
}

#[test]
fn xattrs() {
    let m = Mounted::new(base_fixture());
    m.base.set_xattr("hello.txt", b"user.base", b"b");
    let p = cstr(&m.p("hello.txt"));
    let name = c"user.k";
    let get = |n: &std::ffi::CStr, size: usize| -> Result<Vec<u8>, i32> {
        let mut buf = vec![0u8; size];
        // SAFETY: buffer of `size` bytes.
        let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
        check_size(r).map(|n| {
            buf.truncate(n);
            buf
        })
    };
    let set = |n: &std::ffi::CStr, v: &[u8], flags: i32| -> Result<(), i32> {
        // SAFETY: valid pointers and lengths.
        check(unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), flags) })
    };
    assert_eq!(get(c"user.base", 16).unwrap(), b"b");
    assert_eq!(get(name, 16), Err(libc::ENODATA));
    set(name, b"value", 0).unwrap();
    assert_eq!(get(name, 16).unwrap(), b"value");
    // Size probe and ERANGE.
    // SAFETY: a null buffer with size 0 asks for the size.
    let size = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(size, 5);
    assert_eq!(get(name, 2), Err(libc::ERANGE));
    assert_eq!(set(name, b"x", libc::XATTR_CREATE), Err(libc::EEXIST));
    assert_eq!(
        set(c"user.none", b"x", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    set(name, b"v2", libc::XATTR_REPLACE).unwrap();
    assert_eq!(get(name, 16).unwrap(), b"v2");
    let mut list = vec![0u8; 256];
    // SAFETY: buffer of 256 bytes.
    let n = unsafe { libc::listxattr(p.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    let n = check_size(n).unwrap();
    assert_eq!(&list[..n], b"user.base\0user.k\0");
    // SAFETY: size probe.
    assert_eq!(
        unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) },
        n as isize
    );
    let mut small = [0u8; 3];
    // SAFETY: buffer of 3 bytes.
    let r = unsafe { libc::listxattr(p.as_ptr(), small.as_mut_ptr().cast(), 3) };
    assert_eq!(check_size(r), Err(libc::ERANGE));
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).unwrap();
    // SAFETY: valid C strings.
    assert_eq!(
        check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }),
        Err(libc::ENODATA)
    );
    set(c"user.kept", b"1", 0).unwrap();
    m.flush();
    let e = m.base.entry("hello.txt").unwrap();
    assert_eq!(e.xattrs.get(&b"user.kept"[..]).unwrap(), b"1");
    assert_eq!(m.base.file_content("hello.txt").unwrap(), b"hello world");
}

#[test]
fn chmod_chown_utimens_and_ctime() {
    let m = Mounted::new(base_fixture());
    let p = m.p("hello.txt");
    let before = fs::metadata(&p).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let after = fs::metadata(&p).unwrap();
    assert_eq!(after.permissions().mode() & 0o7777, 0o600);
    assert!(after.ctime() > before.ctime());
    // Root may chown.
    let c = cstr(&p);
    // SAFETY: valid C string.
    check(unsafe { libc::chown(c.as_ptr(), 1234, 5678) }).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));

    // utimensat: a specific time, then "now" for mtime with atime omitted.
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 1_100_000_000,
            tv_nsec: 7,
        },
    ];
    // SAFETY: valid path and two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 5));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_100_000_000, 7));
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: as above.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }).unwrap();
    let md2 = fs::metadata(&p).unwrap();
    assert_eq!(md2.atime(), 1_000_000_000);
    assert!(md2.mtime() > 1_600_000_000);
    // Metadata-only changes keep the content in the base.
    assert_eq!(fs::read(&p).unwrap(), b"hello world");
    m.flush();
    assert_eq!(m.base.entry("hello.txt").unwrap().mode, 0o600);
    assert_eq!(m.base.file_content("hello.txt").unwrap(), b"hello world");
}

#[test]
fn statfs_reports_the_overlay_disk() {
    let m = Mounted::new(MemBase::new());
    let c = cstr(&m.mnt);
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid path and buffer.
    check(unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) }).unwrap();
    // SAFETY: statvfs succeeded.
    let s = unsafe { s.assume_init() };
    assert_eq!(s.f_namemax, 255);
    assert!(s.f_blocks > 0);
    assert!(s.f_bsize > 0);
}

#[test]
fn fsync_is_durable_and_triggers_a_flush() {
    let m = Mounted::new(MemBase::new());
    let mut f = File::create(m.p("synced")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_all().unwrap();
    // The flush fsync requested runs in the background; wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while m.base.file_content("synced").as_deref() != Some(&b"durable"[..]) {
        assert!(
            std::time::Instant::now() < deadline,
            "fsync did not trigger a flush"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // fsyncdir works too.
    File::open(&m.mnt).unwrap().sync_all().unwrap();
}

/// A directory's st_nlink is 2 + its subdirectories (what `find` uses to skip leaves), in
/// the overlay, in the base, across flushes and when the base changes under the mount.
#[test]
fn directory_nlink_counts_subdirectories() {
    let m = Mounted::new(base_fixture());
    let nlink = |rel: &str| fs::symlink_metadata(m.p(rel)).unwrap().nlink();
    // Base directories: docs holds sub (and two files), sub and empty hold none.
    assert_eq!(nlink("docs"), 3);
    assert_eq!(nlink("docs/sub"), 2);
    assert_eq!(nlink("empty"), 2);
    // The root holds docs and empty.
    assert_eq!(nlink(""), 4);

    fs::create_dir(m.p("a")).unwrap();
    assert_eq!(nlink("a"), 2);
    fs::create_dir(m.p("a/b")).unwrap();
    fs::create_dir(m.p("a/c")).unwrap();
    fs::write(m.p("a/f"), b"files do not count").unwrap();
    std::os::unix::fs::symlink("b", m.p("a/l")).unwrap();
    assert_eq!(nlink("a"), 4);
    assert_eq!(nlink(""), 5);
    fs::remove_dir(m.p("a/c")).unwrap();
    assert_eq!(nlink("a"), 3);
    fs::rename(m.p("a/b"), m.p("docs/b")).unwrap();
    assert_eq!(nlink("a"), 2);
    assert_eq!(nlink("docs"), 4);
    // A base directory moved in and out keeps the counts exact.
    fs::rename(m.p("docs/sub"), m.p("a/sub")).unwrap();
    assert_eq!((nlink("a"), nlink("docs")), (3, 3));

    // The flush moves everything into the base: same counts.
    m.flush();
    assert_eq!((nlink("a"), nlink("docs"), nlink("")), (3, 3, 5));

    // A peer's snapshot adds a directory under docs and removes a/sub.
    m.base.insert_dir("docs/peer", 0o755);
    m.base.remove("a/sub");
    m.handle()
        .base_changed(&["docs/peer".to_string(), "a/sub".to_string()]);
    assert_eq!((nlink("docs"), nlink("a")), (4, 2));

    // readdirplus replies carry the counts too: `find` (which trusts them) sees every
    // directory.
    let out = std::process::Command::new("find")
        .arg(&m.mnt)
        .arg("-type")
        .arg("d")
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut found: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(m.mnt.to_str().unwrap()).map(str::to_string))
        .collect();
    found.sort();
    assert_eq!(
        found,
        ["", "/a", "/docs", "/docs/b", "/docs/peer", "/empty"]
    );
}

/// A symlink can have several names like a file (`cp -al` of a tree holding symlinks), and
/// they stay one inode across a flush into the base.
#[test]
fn symlinks_can_be_hard_linked() {
    let m = Mounted::new(base_fixture());
    std::os::unix::fs::symlink("hello.txt", m.p("new-link")).unwrap();
    fs::hard_link(m.p("new-link"), m.p("new-link2")).unwrap();
    // A symlink that came from the base.
    fs::hard_link(m.p("link"), m.p("docs/link2")).unwrap();
    let md = |rel: &str| fs::symlink_metadata(m.p(rel)).unwrap();
    for (a, b) in [("new-link", "new-link2"), ("link", "docs/link2")] {
        for round in ["overlay", "flushed"] {
            let (x, y) = (md(a), md(b));
            assert!(
                x.file_type().is_symlink() && y.file_type().is_symlink(),
                "{round}"
            );
            assert_eq!((x.ino(), x.nlink()), (y.ino(), 2), "{a} {b} {round}");
            assert_eq!(fs::read_link(m.p(b)).unwrap().to_str(), Some("hello.txt"));
            m.flush();
        }
    }
    fs::remove_file(m.p("new-link")).unwrap();
    assert_eq!(md("new-link2").nlink(), 1);
    assert_eq!(
        fs::read_link(m.p("new-link2")).unwrap().to_str(),
        Some("hello.txt")
    );
    m.flush();
    fs::remove_file(m.p("docs/link2")).unwrap();
    assert_eq!(md("link").nlink(), 1);
}
