//! The spool: a push that cannot reach the daemon (`covd push --spool DIR`) keeps what it
//! would have sent in DIR, one file per shard attempt, and `covd push --flush-spool DIR` sends
//! it later.
//!
//! A spool file is the push's own ingest stream, written out: its header (with the push's
//! session id), each delta not yet acknowledged with its sequence number, and its finish. A
//! flush replays that stream as the same push, so the daemon's exactly-once rules apply: it
//! tells from where to resume, skips what it already has, and answers a finished shard as
//! finished. Flushing twice, or from two processes at once, counts the coverage once; a lock on
//! the file keeps two flushes of one file from both sending it.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::rpc::proto::{self, IngestRequest, ingest_request};

/// The first bytes of a spool file (and its format's version).
const MAGIC: &[u8] = b"covd-spool 1\n";

/// The ending of spool files' names.
pub const EXTENSION: &str = "covd-spool";

/// Writes `requests` (header, deltas, finish) as a spool file in `dir`, created if needed;
/// the file appears whole or not at all.
pub fn write(dir: &Path, requests: &[IngestRequest]) -> io::Result<PathBuf> {
    let Some(ingest_request::Msg::Header(header)) = requests.first().and_then(|r| r.msg.as_ref())
    else {
        return Err(io::Error::other("a spooled stream starts with its header"));
    };
    std::fs::create_dir_all(dir)?;
    let session: String = header
        .session_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = format!(
        "{}--{}--{}--{session}.{EXTENSION}",
        file_safe(&header.run_id),
        file_safe(&header.shard_id),
        header.attempt
    );
    let path = dir.join(&name);
    let partial = dir.join(format!(".{name}.partial"));
    {
        let mut out = BufWriter::new(File::create(&partial)?);
        out.write_all(MAGIC)?;
        for request in requests {
            out.write_all(&request.encode_length_delimited_to_vec())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// Reads a spool file: header, deltas with their sequence numbers, finish.
pub fn read(path: &Path) -> io::Result<Spooled> {
    let mut bytes = Vec::new();
    BufReader::new(File::open(path)?).read_to_end(&mut bytes)?;
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| invalid("not a covd spool file (or one of a later format)".into()))?;
    let mut requests = Vec::new();
    while !rest.is_empty() {
        let request = IngestRequest::decode_length_delimited(&mut rest)
            .map_err(|e| invalid(format!("damaged after {} messages: {e}", requests.len())))?;
        requests.push(request);
    }
    let mut messages = requests.into_iter();
    let header = match messages.next().and_then(|r| r.msg) {
        Some(ingest_request::Msg::Header(h)) => h,
        _ => return Err(invalid("it does not start with a header".into())),
    };
    let mut deltas = Vec::new();
    let mut finish = None;
    for request in messages {
        match request.msg {
            Some(ingest_request::Msg::Delta(bytes)) if finish.is_none() => {
                let seq = proto::Delta::decode(bytes.clone())
                    .map_err(|e| invalid(format!("a delta does not decode: {e}")))?
                    .seq;
                deltas.push((
                    seq,
                    IngestRequest {
                        msg: Some(ingest_request::Msg::Delta(bytes)),
                    },
                ));
            }
            Some(ingest_request::Msg::Finish(f)) if finish.is_none() => finish = Some(f),
            _ => return Err(invalid("its messages are out of order".into())),
        }
    }
    let finish = finish.ok_or_else(|| invalid("it ends before its finish (cut short?)".into()))?;
    Ok(Spooled {
        header,
        deltas,
        finish,
    })
}

/// A spooled push.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub header: proto::ShardHeader,
    /// In sequence order.
    pub deltas: Vec<(u64, IngestRequest)>,
    pub finish: proto::Finish,
}

/// The spool files in `dir`, by name.
pub fn entries(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == EXTENSION)
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A name as part of a file name: letters, digits, `-`, `_` and `.` kept, the rest `_`.
fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
