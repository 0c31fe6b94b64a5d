//! errno and libc helpers: the system calls `std::fs` does not offer (xattrs, renameat2,
//! utimensat, raw open/readdir...), each returning the raw `io::Error`.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The errno behind an `io::Error` (panics if it did not come from the OS).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("error without an errno: {e:?}"))
}

/// Assert that `r` failed with exactly `errno`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, errno: i32) {
    match r {
        Ok(v) => panic!("expected {} but succeeded with {v:?}", errno_name(errno)),
        Err(e) => assert_eq!(
            errno_of(&e),
            errno,
            "expected {} got {} ({e})",
            errno_name(errno),
            errno_name(errno_of(&e))
        ),
    }
}

pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::ENOTSUP => "ENOTSUP",
        libc::EILSEQ => "EILSEQ",
        libc::ENOTCONN => "ENOTCONN",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        _ => return format!("errno {errno}"),
    };
    format!("{name}({errno})")
}

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path with NUL")
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// `setxattr(2)` (follows symlinks).
pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `getxattr(2)`: the whole value (sized by a first call).
pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    loop {
        let len =
            cvt_size(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; len + 1];
        match cvt_size(unsafe {
            libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        }) {
            Ok(got) => {
                buf.truncate(got);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue, // grew meanwhile
            Err(e) => return Err(e),
        }
    }
}

fn parse_xattr_list(buf: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    names
}

/// `listxattr(2)`: all names, sorted.
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let p = cpath(p);
    loop {
        let len = cvt_size(unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; len + 1];
        match cvt_size(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }) {
            Ok(got) => return Ok(parse_xattr_list(&buf[..got])),
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `llistxattr(2)` (does not follow symlinks): all names, sorted.
pub fn llistxattr(p: &Path) -> io::Result<Vec<String>> {
    let p = cpath(p);
    loop {
        let len = cvt_size(unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; len + 1];
        match cvt_size(unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
        {
            Ok(got) => return Ok(parse_xattr_list(&buf[..got])),
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `lgetxattr(2)` (does not follow symlinks).
pub fn lgetxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 65536];
    let got = cvt_size(unsafe {
        libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(got);
    Ok(buf)
}

/// `removexattr(2)` (follows symlinks).
pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`.
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (f, t) = (cpath(from), cpath(to));
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// `utimensat(AT_FDCWD, p, times, flags)`; each time is (sec, nsec) where nsec may be
/// `UTIME_NOW` / `UTIME_OMIT`.
pub fn utimensat(p: &Path, atime: (i64, i64), mtime: (i64, i64), flags: i32) -> io::Result<()> {
    let p = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0 as _,
            tv_nsec: atime.1 as _,
        },
        libc::timespec {
            tv_sec: mtime.0 as _,
            tv_nsec: mtime.1 as _,
        },
    ];
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), flags) }).map(drop)
}

pub fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let p = cpath(p);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// `access(2)`.
pub fn access(p: &Path, mode: i32) -> io::Result<()> {
    let p = cpath(p);
    cvt(unsafe { libc::access(p.as_ptr(), mode) }).map(drop)
}

/// `chown(2)` with raw ids (`u32::MAX` = -1 = leave unchanged).
pub fn chown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let p = cpath(p);
    cvt(unsafe { libc::chown(p.as_ptr(), uid, gid) }).map(drop)
}

/// `open(2)` with raw flags; returns an owned `File`.
pub fn open_raw(p: &Path, flags: i32, mode: u32) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    let p = cpath(p);
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// All names a directory yields through libc `readdir(3)`, including `.` and `..`.
pub fn readdir_raw(dir: &Path) -> io::Result<Vec<OsString>> {
    let p = cpath(dir);
    let d = unsafe { libc::opendir(p.as_ptr()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    loop {
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let err = unsafe { *libc::__errno_location() };
            unsafe { libc::closedir(d) };
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
            return Ok(names);
        }
        let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
        names.push(OsStr::from_bytes(name.to_bytes()).to_owned());
    }
}

pub fn euid() -> u32 {
    unsafe { libc::geteuid() }
}
