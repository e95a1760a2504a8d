//! The byte form of what the store keeps: every blob starts with a format version byte, then a
//! postcard body. Line sets use roaring's portable serialization. Decoding checks everything,
//! since a database file can be damaged.

use std::borrow::Cow;
use std::sync::Arc;

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use crate::model::{BranchArm, BranchKey, FileBatch, FileCoverage, Function};

/// The version of every record this build writes. A later build reads this one's records by
/// their version byte.
pub const FORMAT_VERSION: u8 = 1;

/// The version byte of a delta kept as its client encoded it (a `covd.v1.Delta`, see
/// [`crate::service::Delta::wire`]); only the delta log holds these, and the store reads them
/// with its [`WireDecoder`]. Builds that read `FileDelta`'s branch arm columns write 4: a build
/// from before them sees a newer format and refuses the record, where reading it as 2 would
/// silently drop the arms.
pub const WIRE_DELTA_FORMAT: u8 = 4;

/// Wire-form deltas from builds before the branch arm columns; read like 4.
const WIRE_DELTA_FORMAT_2: u8 = 2;

// A later FORMAT_VERSION must not take a byte that means a wire-form delta or a log reference.
// (Builds before the arm columns, at FORMAT_VERSION 1, refuse format 4 as newer than theirs.)
const _: () = assert!(
    FORMAT_VERSION != WIRE_DELTA_FORMAT_2
        && FORMAT_VERSION != crate::persist::log::LOG_REF_FORMAT
        && FORMAT_VERSION != WIRE_DELTA_FORMAT
);

/// Reads a delta the store kept in wire form: its files, or why it cannot. The store has no
/// protocol code of its own; the server hands it the protocol layer's decoder.
pub type WireDecoder = fn(&[u8]) -> Result<FileBatch, String>;

/// A delta log record holding a delta in wire form, in two parts (so that the delta's bytes
/// are not copied).
pub fn wire_record(wire: &bytes::Bytes) -> Vec<bytes::Bytes> {
    vec![
        bytes::Bytes::from_static(&[WIRE_DELTA_FORMAT]),
        wire.clone(),
    ]
}

/// Decodes a delta log record: postcard ([`encode_files`]) or wire form.
pub fn decode_delta(bytes: &[u8], wire: Option<WireDecoder>) -> Result<FileBatch, CodecError> {
    match bytes.split_first() {
        Some((&(WIRE_DELTA_FORMAT | WIRE_DELTA_FORMAT_2), body)) => match wire {
            Some(decode) => decode(body).map_err(CodecError::Malformed),
            None => Err(CodecError::Malformed(
                "a delta in wire form, and no protocol decoder was given to the store".into(),
            )),
        },
        _ => Ok(FileBatch::of_files(&decode_files(bytes)?)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error(
        "record format {0} is newer than this covd understands ({FORMAT_VERSION}); upgrade covd"
    )]
    NewerFormat(u8),
    #[error("record format {0} is unknown")]
    UnknownFormat(u8),
    #[error("malformed record: {0}")]
    Malformed(String),
}

#[derive(Serialize, Deserialize)]
struct StoredFile<'a> {
    #[serde(borrow)]
    path: Cow<'a, str>,
    lines: Vec<u8>,
    hits: Vec<u64>,
    branches: Vec<StoredBranch<'a>>,
    functions: Vec<StoredFunction<'a>>,
    /// Per-test attribution: test name and its lines (roaring's portable form).
    #[serde(borrow)]
    tests: Vec<(Cow<'a, str>, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct StoredBranch<'a> {
    line: u32,
    block: u32,
    index: u32,
    #[serde(borrow)]
    label: Option<Cow<'a, str>>,
    taken: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct StoredFunction<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    start_line: u32,
    end_line: u32,
    hits: u64,
}

/// Encodes files (a delta, or a run's merged files) into one record.
pub fn encode_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a FileCoverage)>) -> Vec<u8> {
    let stored: Vec<StoredFile<'_>> = files.into_iter().map(|(p, f)| stored(p, f)).collect();
    versioned(&stored)
}

fn stored<'a>(path: &'a str, f: &'a FileCoverage) -> StoredFile<'a> {
    let mut lines = Vec::with_capacity(f.lines().serialized_size());
    // Writing into a Vec cannot fail.
    let _ = f.lines().serialize_into(&mut lines);
    StoredFile {
        path: Cow::Borrowed(path),
        lines,
        hits: f.line_hits().map(|(_, h)| h).collect(),
        branches: f
            .branches()
            .iter()
            .map(|(k, taken)| StoredBranch {
                line: k.line,
                block: k.block,
                index: match k.arm {
                    BranchArm::Index(i) => i,
                    BranchArm::Label(_) => 0,
                },
                label: match &k.arm {
                    BranchArm::Label(l) => Some(Cow::Borrowed(l)),
                    BranchArm::Index(_) => None,
                },
                taken: *taken,
            })
            .collect(),
        functions: f
            .functions()
            .iter()
            .map(|func| StoredFunction {
                name: Cow::Borrowed(&func.name),
                start_line: func.start_line,
                end_line: func.end_line,
                hits: func.hits,
            })
            .collect(),
        tests: f
            .tests()
            .iter()
            .map(|(name, lines)| {
                let mut bytes = Vec::with_capacity(lines.serialized_size());
                let _ = lines.serialize_into(&mut bytes);
                (Cow::Borrowed(&**name), bytes)
            })
            .collect(),
    }
}

/// Decodes a record written by [`encode_files`].
pub fn decode_files(bytes: &[u8]) -> Result<Vec<(Arc<str>, FileCoverage)>, CodecError> {
    let stored: Vec<StoredFile<'_>> = unversioned(bytes)?;
    stored
        .into_iter()
        .map(|s| {
            let lines = RoaringBitmap::deserialize_from(&s.lines[..])
                .map_err(|e| CodecError::Malformed(format!("line set of {}: {e}", s.path)))?;
            let lines: Vec<u32> = lines.iter().collect();
            let mut file = FileCoverage::from_sorted_lines(&lines, &s.hits).ok_or_else(|| {
                CodecError::Malformed(format!(
                    "{}: {} counts for {} lines",
                    s.path,
                    s.hits.len(),
                    lines.len()
                ))
            })?;
            file.set_branches(
                s.branches
                    .into_iter()
                    .map(|br| {
                        let arm = match br.label {
                            Some(l) => BranchArm::Label(l.as_ref().into()),
                            None => BranchArm::Index(br.index),
                        };
                        let key = BranchKey {
                            line: br.line,
                            block: br.block,
                            arm,
                        };
                        (key, br.taken)
                    })
                    .collect(),
            );
            file.set_functions(
                s.functions
                    .into_iter()
                    .map(|f| Function {
                        name: f.name.as_ref().into(),
                        start_line: f.start_line,
                        end_line: f.end_line,
                        hits: f.hits,
                    })
                    .collect(),
            );
            let tests = s
                .tests
                .into_iter()
                .map(|(name, bytes)| {
                    let lines = RoaringBitmap::deserialize_from(&bytes[..]).map_err(|e| {
                        CodecError::Malformed(format!("test lines of {}: {e}", s.path))
                    })?;
                    Ok((Arc::<str>::from(name.as_ref()), lines))
                })
                .collect::<Result<Vec<_>, CodecError>>()?;
            file.set_tests(tests);
            Ok((Arc::from(s.path.as_ref()), file))
        })
        .collect()
}

/// Encodes any record with the version byte in front.
pub fn versioned<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // postcard only fails on writer errors or unsupported types; a Vec and plain structs
    // have neither.
    if let Ok(body) = postcard::to_allocvec(value) {
        out.extend_from_slice(&body);
    }
    out
}

/// Decodes a record written by [`versioned`].
pub fn unversioned<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        FORMAT_VERSION => {
            postcard::from_bytes(body).map_err(|e| CodecError::Malformed(e.to_string()))
        }
        v if v > FORMAT_VERSION => Err(CodecError::NewerFormat(v)),
        v => Err(CodecError::UnknownFormat(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FileBuilder;

    #[test]
    fn files_round_trip_and_damage_is_an_error() {
        let mut b = FileBuilder::new();
        b.line(3, 7);
        b.line(9, 0);
        b.branch(
            BranchKey {
                line: 3,
                block: 0,
                arm: BranchArm::Label("jump to line 9".into()),
            },
            None,
        );
        b.branch(
            BranchKey {
                line: 3,
                block: 1,
                arm: BranchArm::Index(2),
            },
            Some(4),
        );
        b.function("f", 3, 9, 7);
        b.test_line(&Arc::from("t"), 3);
        let f = b.build();
        let bytes = encode_files([("src/a.c", &f)]);
        assert_eq!(bytes[0], FORMAT_VERSION);
        let back = decode_files(&bytes).unwrap();
        assert_eq!(&*back[0].0, "src/a.c");
        assert_eq!(back[0].1, f);

        assert!(matches!(
            decode_files(&bytes[..bytes.len() / 2]),
            Err(CodecError::Malformed(_))
        ));
        let mut newer = bytes.clone();
        newer[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode_files(&newer),
            Err(CodecError::NewerFormat(_))
        ));
        assert!(matches!(decode_files(&[]), Err(CodecError::Empty)));
    }

    #[test]
    fn wire_deltas_need_the_protocol_decoder() {
        fn decoder(body: &[u8]) -> Result<FileBatch, String> {
            match body {
                b"ok" => Ok(FileBatch::of_files(&[("a.c", FileCoverage::default())])),
                _ => Err("not a delta".into()),
            }
        }
        let record = wire_record(&bytes::Bytes::from_static(b"ok")).concat();
        // 4 since the branch arm columns: builds that do not read them refuse the record.
        assert_eq!(record[0], 4);
        assert_eq!(decode_delta(&record, Some(decoder)).unwrap().len(), 1);
        let e = decode_delta(&record, None).unwrap_err();
        assert!(e.to_string().contains("no protocol decoder"), "{e}");
        let e = decode_delta(
            &wire_record(&bytes::Bytes::from_static(b"no")).concat(),
            Some(decoder),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a delta"), "{e}");
        // Wire records from before the arm columns still read.
        let mut older = record.clone();
        older[0] = WIRE_DELTA_FORMAT_2;
        assert_eq!(decode_delta(&older, Some(decoder)).unwrap().len(), 1);
        // Records written by encode_files still read.
        let postcard = encode_files([("b.c", &FileCoverage::default())]);
        let batch = decode_delta(&postcard, None).unwrap();
        assert_eq!(batch.paths().collect::<Vec<_>>(), ["b.c"]);
    }
}
