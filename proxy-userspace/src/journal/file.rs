//! The journal's files: append-only, of fixed-size frames, in the
//! `journal/` directory under the store's (`<store.path>/journal/`,
//! `<generation>.wal`, generations numbered upwards). A commit is one
//! `pwrite` of its frames at the end of the current file and one
//! `fdatasync`; a file is cut (emptied, or closed and later deleted) only
//! after a snapshot covering all its records is durable in the store.
//!
//! A frame is [`FRAME`] bytes (integers little-endian):
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | sequence number |
//! | 8 | kind ([`super::Kind`]) |
//! | 9 | value length (0 for a settlement) |
//! | 10..89 | value ([`super::record`]), zero padded |
//! | 89..92 | zero |
//! | 92..96 | CRC-32 of bytes 0..92 |
//!
//! A file ending in less than a frame, or in a frame whose checksum does
//! not match, was torn by a crash while a commit was being written: that
//! commit was never acknowledged, so what follows is ignored. A bad
//! checksum anywhere else stops the replay of that file there, and says so.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{Record, Stored, writer::Log};

/// One record on disk.
pub const FRAME: usize = 96;
const VALUE_AT: usize = 10;
const CRC_AT: usize = 92;

/// A frame, encoded.
pub(super) type Frame = [u8; FRAME];

/// `r` as a frame.
pub(super) fn frame(r: &Record) -> Frame {
    let mut f = [0u8; FRAME];
    let (seq, kind) = r.key();
    let value = r.encode();
    let v = value.as_bytes();
    f[..8].copy_from_slice(&seq.to_le_bytes());
    f[8] = kind;
    f[9] = v.len() as u8;
    f[VALUE_AT..VALUE_AT + v.len()].copy_from_slice(v);
    let crc = crc32fast::hash(&f[..CRC_AT]);
    f[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    f
}

/// The sequence number of a frame.
pub(super) fn seq_of(f: &Frame) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&f[..8]);
    u64::from_le_bytes(a)
}

/// Where the readable part of a file ends, when it is not its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Less than a frame at `offset`: a torn tail, ignored.
    Torn { offset: u64 },
    /// The frame at `offset` does not match its checksum; `after` more
    /// bytes follow it (none: a torn last frame).
    BadChecksum { offset: u64, after: u64 },
}

/// What a file holds.
#[derive(Debug, Default)]
pub struct Read {
    pub records: Vec<Stored>,
    /// The highest sequence number read.
    pub max_seq: u64,
    pub stop: Option<Stop>,
}

/// The records in `bytes` (a file's content), up to the first frame that
/// is torn or does not match its checksum.
pub fn read(bytes: &[u8]) -> Read {
    let mut out = Read::default();
    for (n, f) in bytes.chunks(FRAME).enumerate() {
        let offset = (n * FRAME) as u64;
        let Ok(f) = <&Frame>::try_from(f) else {
            out.stop = Some(Stop::Torn { offset });
            break;
        };
        let len = usize::from(f[9]);
        if crc32fast::hash(&f[..CRC_AT]).to_le_bytes() != f[CRC_AT..] || VALUE_AT + len > CRC_AT {
            let after = bytes.len() as u64 - offset - FRAME as u64;
            out.stop = Some(Stop::BadChecksum { offset, after });
            break;
        }
        let seq = seq_of(f);
        out.max_seq = out.max_seq.max(seq);
        out.records.push(((seq, f[8]), f[VALUE_AT..VALUE_AT + len].to_vec()));
    }
    out
}

/// The journal's directory, shared by the store (which replays it and
/// says when a snapshot is durable) and the writer (which appends to it).
#[derive(Debug)]
pub struct Dir {
    path: PathBuf,
    /// The watermark of the last durable snapshot.
    covered: AtomicU64,
    /// Files of earlier runs (path, highest sequence number in them),
    /// deleted once a snapshot covers them.
    old: Mutex<Vec<(PathBuf, u64)>>,
    /// The first generation this run's writer made (`u64::MAX`: none).
    writer_from: AtomicU64,
}

fn generation(p: &Path) -> Option<u64> {
    let name = p.file_name()?.to_str()?;
    name.strip_suffix(".wal")?.parse().ok()
}

fn name(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.wal"))
}

/// Make `dir`'s entries (a file created or deleted) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Dir {
    /// `<store>/journal`, created if needed.
    pub fn open(store: &Path) -> io::Result<Arc<Dir>> {
        let path = store.join("journal");
        std::fs::create_dir_all(&path)?;
        Ok(Arc::new(Dir {
            path,
            covered: AtomicU64::new(0),
            old: Mutex::new(Vec::new()),
            writer_from: AtomicU64::new(u64::MAX),
        }))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The journal's files, oldest first.
    fn files(&self) -> io::Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.path)? {
            let p = e?.path();
            if let Some(g) = generation(&p) {
                out.push((g, p));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every record in the journal's files, oldest file first; each file's
    /// readable part only (a torn tail or a bad checksum is logged). Files
    /// of earlier runs are deleted once a snapshot covers them.
    pub fn replay(&self) -> io::Result<Vec<Stored>> {
        let from = self.writer_from.load(Ordering::SeqCst);
        let mut records = Vec::new();
        let mut old = Vec::new();
        for (g, p) in self.files()? {
            let r = read(&std::fs::read(&p)?);
            match r.stop {
                Some(Stop::Torn { offset }) => {
                    tracing::info!(file = %p.display(), offset, "journal: a torn last record (never acknowledged) is ignored");
                }
                Some(Stop::BadChecksum { offset, after: 0 }) => {
                    tracing::info!(file = %p.display(), offset, "journal: a torn last record (never acknowledged) is ignored");
                }
                Some(Stop::BadChecksum { offset, after }) => {
                    tracing::warn!(file = %p.display(), offset, bytes_after = after,
                        "journal: a record does not match its checksum; this file's replay stops there");
                }
                None => {}
            }
            tracing::debug!(generation = g, records = r.records.len(), "journal file replayed");
            if g < from {
                old.push((p, r.max_seq));
            }
            records.extend(r.records);
        }
        *self.old.lock().unwrap_or_else(PoisonError::into_inner) = old;
        Ok(records)
    }

    /// A snapshot whose watermark is `seq` is durable: the files it covers
    /// may go (earlier runs' now, the writer's at its next commit).
    pub fn covered(&self, seq: u64) {
        self.covered.fetch_max(seq, Ordering::SeqCst);
        let mut old = self.old.lock().unwrap_or_else(PoisonError::into_inner);
        let before = old.len();
        old.retain(|(p, max)| {
            *max > seq
                || match std::fs::remove_file(p) {
                    Ok(()) => false,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                    Err(e) => {
                        tracing::warn!(file = %p.display(), error = %e, "journal: a covered file cannot be deleted");
                        true
                    }
                }
        });
        if old.len() != before {
            let _ = sync_dir(&self.path);
        }
    }

    /// A new file, after every existing one, for this run's writer.
    fn create(&self) -> io::Result<(u64, PathBuf, File)> {
        let g = self.files()?.last().map_or(1, |(g, _)| g + 1);
        self.writer_from.fetch_min(g, Ordering::SeqCst);
        let p = name(&self.path, g);
        let f = OpenOptions::new().write(true).create_new(true).open(&p)?;
        sync_dir(&self.path)?;
        Ok((g, p, f))
    }

    /// This run's writer's log, on a new file.
    pub fn log(self: &Arc<Self>) -> io::Result<Wal> {
        let (_, path, file) = self.create()?;
        Ok(Wal { dir: self.clone(), file, path, len: 0, max_seq: 0, sealed: None, applied: 0 })
    }
}

/// The writer's files: the current one, and the one before it until a
/// snapshot covers it.
#[derive(Debug)]
pub struct Wal {
    dir: Arc<Dir>,
    file: File,
    path: PathBuf,
    /// Bytes acknowledged in `file`.
    len: u64,
    max_seq: u64,
    /// The previous file and its highest sequence number.
    sealed: Option<(PathBuf, u64)>,
    /// The watermark already acted on.
    applied: u64,
}

impl Log for Wal {
    fn append(&mut self, frames: &[u8], max_seq: u64) -> io::Result<()> {
        // A failed commit's bytes are overwritten by the next one.
        self.file.write_all_at(frames, self.len)?;
        self.file.sync_data()?;
        self.len += frames.len() as u64;
        self.max_seq = self.max_seq.max(max_seq);
        Ok(())
    }

    fn cut(&mut self) -> io::Result<()> {
        let w = self.dir.covered.load(Ordering::SeqCst);
        if w <= self.applied {
            return Ok(());
        }
        self.applied = w;
        if let Some((p, max)) = &self.sealed
            && *max <= w
        {
            std::fs::remove_file(p)?;
            self.sealed = None;
        }
        if self.len == 0 {
            return Ok(());
        }
        if self.max_seq <= w {
            // All of it is in the snapshot. Should the shorter length not
            // reach the disk, replay skips what the snapshot includes.
            self.file.set_len(0)?;
            (self.len, self.max_seq) = (0, 0);
        } else if self.sealed.is_none() {
            let (_, path, file) = self.dir.create()?;
            let old = std::mem::replace(&mut self.path, path);
            self.file = file;
            self.sealed = Some((old, self.max_seq));
            (self.len, self.max_seq) = (0, 0);
        }
        Ok(())
    }
}
