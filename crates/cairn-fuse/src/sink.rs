use std::fs::File;
use std::io;
use std::path::PathBuf;

use cairn_overlay::Record;

/// A staging file holding the full content of one dirty file. `file` is opened for this
/// flush, so the sink can read it even if the path is unlinked meanwhile.
#[derive(Debug)]
pub struct StagedFile {
    pub path: PathBuf,
    pub file: File,
}

/// One dirty path. `record.data` says where the content is: [`cairn_overlay::Data::Base`]
/// (unchanged at this path in the base as it was before this batch), `Staged` (read
/// `staged`), `Content` (a base content reference, e.g. a renamed file), `Target`
/// (symlink), or none (directories and whiteouts, i.e. deletions).
#[derive(Debug)]
pub struct FlushItem {
    pub path: String,
    pub record: Record,
    pub staged: Option<StagedFile>,
}

/// Every dirty record, in path order.
#[derive(Debug, Default)]
pub struct FlushBatch {
    pub items: Vec<FlushItem>,
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("reading staged data for the flush failed: {0}")]
    Io(#[from] io::Error),
    #[error("the engine rejected the flush: {0}")]
    Rejected(String),
    /// A flush failure reported to a waiter other than the one who saw it first.
    #[error("flush failed: {0}")]
    Failed(String),
}

/// Where flushed overlay records go. After `flush` returns Ok the base layer must already
/// reflect the whole batch (the daemon commits it into a snapshot and swaps its base); the
/// FUSE layer then retires the records that did not change meanwhile.
pub trait FlushSink: Send + Sync {
    fn flush(&self, batch: FlushBatch) -> Result<(), FlushError>;
}
