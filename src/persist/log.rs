//! The delta log: each run's deltas appended to a file of the run's own, in `deltas/` beside
//! the database. The database keeps, per delta, a small reference to them (file, offset,
//! length, CRC-32), in the row where it used to keep the delta itself.
//!
//! Deltas are nearly all the daemon writes, and each is read back only if the daemon restarts
//! (or an attempt is replaced) before its run completes; once the run is compacted, its log
//! file is deleted whole. As SQLite rows, every delta was written twice, to the WAL and then
//! by the checkpoint into the database file: the writer thread was 27% of the daemon's CPU on
//! the ingest benchmark (16 shards × 35,000 files), most of it in those two copies. Here each
//! delta is written once, at the end of a file.
//!
//! Order: a group's appends are fsynced before the transaction that references them commits,
//! so a committed reference always points at durable bytes. Bytes appended by a group that
//! never committed (a crash, a failed commit), and the deltas of an attempt that a later one
//! replaced, are never read again; they stay in the file (and count toward `--max-db-bytes`)
//! until the run is compacted, deleted or expires.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::codec::CodecError;

/// The directory of the log files, inside the data directory.
pub const DIR: &str = "deltas";

/// The version byte of a database row that refers to a delta in a log file.
pub const LOG_REF_FORMAT: u8 = 3;

/// Open log files the writer keeps at most; past that it closes them all (they reopen on the
/// next append). Bounds the descriptors that runs left open forever would take.
const MAX_OPEN: usize = 256;

/// Where a delta's bytes are: log file, offset, length, and their CRC-32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRef {
    pub file: u64,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

const REF_BYTES: usize = 1 + 8 + 8 + 8 + 4;

impl LogRef {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REF_BYTES);
        out.push(LOG_REF_FORMAT);
        out.extend_from_slice(&self.file.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// Reads a reference row (the caller saw its version byte).
    pub fn decode(bytes: &[u8]) -> Result<LogRef, CodecError> {
        if bytes.len() != REF_BYTES || bytes[0] != LOG_REF_FORMAT {
            return Err(CodecError::Malformed(format!(
                "a delta log reference of {} bytes",
                bytes.len()
            )));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[25..29]);
        Ok(LogRef {
            file: u64_at(1),
            offset: u64_at(9),
            len: u64_at(17),
            crc: u32::from_le_bytes(crc),
        })
    }
}

fn file_name(id: u64) -> String {
    format!("{id:016}.log")
}

fn id_of(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The writer thread's side: appends, syncs, deletes.
#[derive(Debug)]
pub struct Appender {
    dir: PathBuf,
    /// Open files and their lengths.
    files: HashMap<u64, (File, u64)>,
    /// Files appended to since the last sync.
    unsynced: Vec<u64>,
    /// A file was created since the last sync (the directory needs one too).
    created: bool,
    /// The size of every log file, for the store's size cap.
    bytes: u64,
}

impl Appender {
    /// Opens the log directory, deleting files that no live reference can point into (`live`
    /// holds the files the database names): a crash between a commit that dropped a run's log
    /// and the file's deletion leaves one behind.
    pub fn open(dir: &Path, live: &HashSet<u64>) -> std::io::Result<Appender> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            // The directory's own entry, so that files made in it later are found after a
            // power cut.
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut bytes = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(id_of) else {
                continue;
            };
            if live.contains(&id) {
                bytes += entry.metadata()?.len();
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(Appender {
            dir: dir.to_owned(),
            files: HashMap::new(),
            unsynced: Vec::new(),
            created: false,
            bytes,
        })
    }

    /// The size of every log file.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends `chunks` (one delta) to log file `id`, creating it if needed.
    pub fn append(&mut self, id: u64, chunks: &[Bytes]) -> std::io::Result<LogRef> {
        if !self.files.contains_key(&id) {
            if self.files.len() >= MAX_OPEN {
                self.sync()?;
                self.files.clear();
            }
            let path = self.dir.join(file_name(id));
            let file = match File::options().append(true).create_new(true).open(&path) {
                Ok(file) => {
                    self.created = true;
                    file
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    File::options().append(true).open(&path)?
                }
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            self.files.insert(id, (file, len));
        }
        let Some((file, len)) = self.files.get_mut(&id) else {
            unreachable!("inserted above")
        };
        let mut crc = crc32fast::Hasher::new();
        let mut written = 0u64;
        for chunk in chunks {
            file.write_all(chunk)?;
            crc.update(chunk);
            written += chunk.len() as u64;
        }
        let at = LogRef {
            file: id,
            offset: *len,
            len: written,
            crc: crc.finalize(),
        };
        *len += written;
        self.bytes += written;
        if !self.unsynced.contains(&id) {
            self.unsynced.push(id);
        }
        Ok(at)
    }

    /// Makes every append so far durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        for id in self.unsynced.drain(..) {
            if let Some((file, _)) = self.files.get(&id) {
                file.sync_data()?;
            }
        }
        if self.created {
            // The new files' directory entries.
            File::open(&self.dir)?.sync_all()?;
            self.created = false;
        }
        Ok(())
    }

    /// Deletes log file `id` (its references are gone).
    pub fn remove(&mut self, id: u64) -> std::io::Result<()> {
        self.files.remove(&id);
        self.unsynced.retain(|u| *u != id);
        let path = self.dir.join(file_name(id));
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        std::fs::remove_file(&path)?;
        self.bytes = self.bytes.saturating_sub(len);
        Ok(())
    }
}

/// Reads deltas back through their references, keeping the last file open.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    open: Option<(u64, File)>,
}

impl LogReader {
    pub fn new(dir: &Path) -> LogReader {
        LogReader {
            dir: dir.to_owned(),
            open: None,
        }
    }

    /// The bytes `at` refers to, checked against its CRC.
    pub fn read(&mut self, at: &LogRef) -> Result<Vec<u8>, CodecError> {
        let damaged = |what: String| CodecError::Malformed(format!("delta log: {what}"));
        if self.open.as_ref().is_none_or(|(id, _)| *id != at.file) {
            let path = self.dir.join(file_name(at.file));
            let file = File::open(&path)
                .map_err(|e| damaged(format!("cannot open {}: {e}", path.display())))?;
            self.open = Some((at.file, file));
        }
        let Some((_, file)) = &self.open else {
            unreachable!("opened above")
        };
        let len = usize::try_from(at.len)
            .ok()
            .filter(|l| *l <= isize::MAX as usize)
            .ok_or_else(|| damaged(format!("a length of {} bytes", at.len)))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if at.offset.checked_add(at.len).is_none_or(|end| end > size) {
            return Err(damaged(format!(
                "file {} ends at byte {size}, before the delta at {}..+{}",
                file_name(at.file),
                at.offset,
                at.len
            )));
        }
        let mut bytes = vec![0u8; len];
        file.read_exact_at(&mut bytes, at.offset)
            .map_err(|e| damaged(format!("reading {}: {e}", file_name(at.file))))?;
        if crc32fast::hash(&bytes) != at.crc {
            return Err(damaged(format!(
                "the delta at {}..+{} of {} fails its checksum",
                at.offset,
                at.len,
                file_name(at.file)
            )));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_deltas_read_back_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Appender::open(dir.path(), &HashSet::new()).unwrap();
        let a = log
            .append(
                7,
                &[Bytes::from_static(b"\x02"), Bytes::from_static(b"first")],
            )
            .unwrap();
        let b = log.append(7, &[Bytes::from_static(b"second")]).unwrap();
        log.sync().unwrap();
        assert_eq!((a.offset, a.len, b.offset, b.len), (0, 6, 6, 6));
        assert_eq!(LogRef::decode(&b.encode()).unwrap(), b);
        assert_eq!(log.bytes(), 12);

        let mut reader = LogReader::new(dir.path());
        assert_eq!(reader.read(&a).unwrap(), b"\x02first");
        assert_eq!(reader.read(&b).unwrap(), b"second");
        let e = reader
            .read(&LogRef {
                crc: b.crc ^ 1,
                ..b
            })
            .unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        let e = reader.read(&LogRef { len: 100, ..b }).unwrap_err();
        assert!(e.to_string().contains("ends at byte 12"), "{e}");
        assert!(LogRef::decode(&b.encode()[..20]).is_err());

        // A file no reference names is deleted when the log opens again.
        drop(log);
        std::fs::write(dir.path().join(file_name(9)), b"orphan").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"kept").unwrap();
        let mut log = Appender::open(dir.path(), &HashSet::from([7])).unwrap();
        assert!(!dir.path().join(file_name(9)).exists());
        assert!(dir.path().join("notes.txt").exists());
        assert_eq!(log.bytes(), 12);
        // Appends continue at the end; removal deletes the file.
        let c = log.append(7, &[Bytes::from_static(b"third")]).unwrap();
        assert_eq!(c.offset, 12);
        log.remove(7).unwrap();
        assert_eq!(log.bytes(), 0);
        assert!(reader.read(&LogRef { file: 8, ..a }).is_err());
    }
}
