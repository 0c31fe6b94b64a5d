//! Where log lines go: stderr for everybody (warnings and errors unless `RUST_LOG` says
//! otherwise), and for the mount daemon also `<vault dir>/log/cairn.YYYY-MM-DD.log` (info and
//! up unless `RUST_LOG` says otherwise), rolled daily with the last 7 days kept. A daemon
//! started by systemd or fstab has no terminal anyone reads, so the file is where its story
//! is told.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use tracing_appender::rolling::{RollingFileAppender, RollingWriter, Rotation};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

const KEEP_FILES: usize = 7;

/// The daemon's log file, once [`log_to_file`] opened it. The file layer exists from the
/// start (a global subscriber cannot be replaced later) and writes nowhere until then.
static FILE: OnceLock<RollingFileAppender> = OnceLock::new();

struct LateFile;

enum LateWriter<'a> {
    File(RollingWriter<'a>),
    Nowhere,
}

impl Write for LateWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LateWriter::File(w) => w.write(buf),
            LateWriter::Nowhere => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LateWriter::File(w) => w.flush(),
            LateWriter::Nowhere => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for LateFile {
    type Writer = LateWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        match FILE.get() {
            Some(f) => LateWriter::File(f.make_writer()),
            None => LateWriter::Nowhere,
        }
    }
}

fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// Installs the global subscriber; call once, first thing in `main`. `stderr_default` is the
/// stderr filter unless `RUST_LOG` is set (`"warn"` for everything but the relay).
pub fn init(stderr_default: &str) {
    // Colours only for a terminal: under systemd stderr goes to the journal, where escape
    // codes show up as noise.
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_writer(io::stderr)
        .with_filter(filter(stderr_default));
    let file = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(LateFile)
        .with_filter(filter("info"));
    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .init();
}

/// The directory of a vault's log files.
pub fn log_dir(vault_dir: &Path) -> PathBuf {
    vault_dir.join("log")
}

/// From now on, log lines also go to the vault's log file.
pub fn log_to_file(vault_dir: &Path) -> Result<()> {
    let dir = log_dir(vault_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let appender = RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix("cairn")
        .filename_suffix("log")
        .max_log_files(KEEP_FILES)
        .build(&dir)
        .with_context(|| format!("opening a log file in {}", dir.display()))?;
    // A second call (never made today) keeps the first file rather than failing the mount.
    let _ = FILE.set(appender);
    Ok(())
}
