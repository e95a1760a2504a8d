//! The byte form of what the store keeps. Every blob starts with a version byte:
//!
//! - [`RECORD_FORMAT`] (5): a protobuf message of `proto/covd/store/v1/records.proto`
//!   ([`super::records`]). Every record is written so; the schema evolves by adding fields,
//!   without a new version byte.
//! - [`LEGACY_FORMAT`] (1): a postcard body, written by the first release. Read (see
//!   `legacy`), never written.
//! - 2 and [`WIRE_DELTA_FORMAT`] (4): a delta as its client encoded it (delta log only); 3: a
//!   row referring to a delta in the log ([`super::log::LOG_REF_FORMAT`]).
//!
//! Line sets use roaring's portable serialization. Decoding checks everything, since a
//! database file can be damaged.

use std::sync::Arc;

use prost::Message;
use roaring::RoaringBitmap;

use super::legacy::{self, Legacy};
use super::records::{
    BranchRecord, FileLinesRecord, FileListRecord, FileRecord, FilesRecord, FunctionRecord,
    RunRecord, ShardLinesRecord, ShardRecord, SummaryRecord, TestLinesRecord,
};
use crate::model::{BranchArm, BranchKey, FileBatch, FileCoverage, Function};

/// The version byte of every record this build writes: a protobuf message.
pub const RECORD_FORMAT: u8 = 5;

/// The version byte of the first release's records (postcard), which this build reads.
pub const LEGACY_FORMAT: u8 = 1;

/// The format of a data directory (its `meta` table): the newest record form it may hold. A
/// build refuses a directory of a higher format at start, rather than meet records it cannot
/// read later. Fields added to the protobuf records do not change it.
pub const FORMAT_VERSION: u8 = RECORD_FORMAT;

/// The version byte of a delta kept as its client encoded it (a `covd.v1.Delta`, see
/// [`crate::service::Delta::wire`]); only the delta log holds these, and the store reads them
/// with its [`WireDecoder`]. Builds that read `FileDelta`'s branch arm columns write 4: a build
/// from before them sees a newer format and refuses the record, where reading it as 2 would
/// silently drop the arms.
pub const WIRE_DELTA_FORMAT: u8 = 4;

/// Wire-form deltas from builds before the branch arm columns; read like 4.
const WIRE_DELTA_FORMAT_2: u8 = 2;

// Each version byte means one thing.
const _: () = assert!(
    RECORD_FORMAT != WIRE_DELTA_FORMAT_2
        && RECORD_FORMAT != crate::persist::log::LOG_REF_FORMAT
        && RECORD_FORMAT != WIRE_DELTA_FORMAT
        && RECORD_FORMAT != LEGACY_FORMAT
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

/// Decodes a delta log record: files ([`encode_files`]) or wire form.
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
        "record format {0} is newer than this covd understands ({RECORD_FORMAT}); upgrade covd"
    )]
    NewerFormat(u8),
    #[error("record format {0} is unknown")]
    UnknownFormat(u8),
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// A kind of record the store keeps, and the form the first release wrote it in.
pub(crate) trait Record: Message + Default + Sized {
    #[doc(hidden)]
    type Legacy<'a>: Legacy<'a, Current = Self>;
}

impl Record for RunRecord {
    type Legacy<'a> = legacy::Run;
}

impl Record for ShardRecord {
    type Legacy<'a> = legacy::Shard;
}

impl Record for SummaryRecord {
    type Legacy<'a> = legacy::Summary;
}

impl Record for FileListRecord {
    type Legacy<'a> = legacy::FileList;
}

/// Encodes a record with the version byte in front.
pub fn encode<R: Message>(record: &R) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + record.encoded_len());
    out.push(RECORD_FORMAT);
    // Writing into a Vec with room for the message cannot fail.
    let _ = record.encode(&mut out);
    out
}

/// Decodes a record written by [`encode`], or by the first release.
pub(crate) fn decode<R: Record>(bytes: &[u8]) -> Result<R, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        RECORD_FORMAT => R::decode(body).map_err(|e| CodecError::Malformed(e.to_string())),
        LEGACY_FORMAT => Ok(legacy::read::<R::Legacy<'_>>(body)?.upgrade()),
        v => Err(unreadable(v)),
    }
}

/// Decodes a kind of record that came after the first release (it has no postcard form).
pub(crate) fn decode_later<R: Message + Default>(bytes: &[u8]) -> Result<R, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        RECORD_FORMAT => R::decode(body).map_err(|e| CodecError::Malformed(e.to_string())),
        v => Err(unreadable(v)),
    }
}

fn unreadable(version: u8) -> CodecError {
    if version > RECORD_FORMAT {
        CodecError::NewerFormat(version)
    } else {
        CodecError::UnknownFormat(version)
    }
}

/// Encodes files (a delta, or a part of a run's merged files) into one record.
pub fn encode_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a FileCoverage)>) -> Vec<u8> {
    let record = FilesRecord {
        files: files.into_iter().map(|(p, f)| file_record(p, f)).collect(),
    };
    encode(&record)
}

/// Encodes the covered lines of some of a shard's files into one record.
pub fn encode_shard_lines<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a RoaringBitmap)>,
) -> Vec<u8> {
    let record = ShardLinesRecord {
        files: files
            .into_iter()
            .map(|(path, covered)| FileLinesRecord {
                path: path.to_owned(),
                covered: roaring_bytes(covered),
            })
            .collect(),
    };
    encode(&record)
}

/// Decodes a record written by [`encode_shard_lines`].
pub fn decode_shard_lines(bytes: &[u8]) -> Result<Vec<(Arc<str>, RoaringBitmap)>, CodecError> {
    // Later than the first release: no legacy form.
    let record = match bytes.split_first().ok_or(CodecError::Empty)? {
        (&RECORD_FORMAT, body) => {
            ShardLinesRecord::decode(body).map_err(|e| CodecError::Malformed(e.to_string()))?
        }
        (&v, _) => return Err(unreadable(v)),
    };
    record
        .files
        .into_iter()
        .map(|f| {
            let covered = RoaringBitmap::deserialize_from(&f.covered[..])
                .map_err(|e| CodecError::Malformed(format!("line set of {}: {e}", f.path)))?;
            Ok((Arc::from(f.path), covered))
        })
        .collect()
}

/// The version byte of a stored source text: deflate (RFC 1951) follows. Source code shrinks
/// to about a quarter, and a text is written once and read only by the dashboard.
const SOURCE_DEFLATE: u8 = 1;

/// Encodes a source text for storage: a version byte, then the text compressed.
pub fn encode_source(text: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut out =
        flate2::write::DeflateEncoder::new(vec![SOURCE_DEFLATE], flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = out.write_all(text);
    out.finish().unwrap_or_default()
}

/// Decodes a text written by [`encode_source`].
pub fn decode_source(bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    use std::io::Read as _;
    match bytes.split_first().ok_or(CodecError::Empty)? {
        (&SOURCE_DEFLATE, body) => {
            let mut text = Vec::new();
            flate2::read::DeflateDecoder::new(body)
                .read_to_end(&mut text)
                .map_err(|e| CodecError::Malformed(format!("source text: {e}")))?;
            Ok(text)
        }
        (&v, _) => Err(CodecError::UnknownFormat(v)),
    }
}

fn roaring_bytes(lines: &RoaringBitmap) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.serialized_size());
    // Writing into a Vec cannot fail.
    let _ = lines.serialize_into(&mut out);
    out
}

fn file_record(path: &str, f: &FileCoverage) -> FileRecord {
    FileRecord {
        path: path.to_owned(),
        lines: roaring_bytes(f.lines()),
        hits: f.line_hits().map(|(_, h)| h).collect(),
        branches: f
            .branches()
            .iter()
            .map(|(k, taken)| BranchRecord {
                line: k.line,
                block: k.block,
                index: match k.arm {
                    BranchArm::Index(i) => i,
                    BranchArm::Label(_) => 0,
                },
                label: match &k.arm {
                    BranchArm::Label(l) => Some(l.to_string()),
                    BranchArm::Index(_) => None,
                },
                taken: *taken,
            })
            .collect(),
        functions: f
            .functions()
            .iter()
            .map(|func| FunctionRecord {
                name: func.name.to_string(),
                start_line: func.start_line,
                end_line: func.end_line,
                hits: func.hits,
            })
            .collect(),
        tests: f
            .tests()
            .iter()
            .map(|(name, lines)| TestLinesRecord {
                test: name.to_string(),
                lines: roaring_bytes(lines),
            })
            .collect(),
    }
}

/// Decodes a record written by [`encode_files`], or by the first release.
pub fn decode_files(bytes: &[u8]) -> Result<Vec<(Arc<str>, FileCoverage)>, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    let records = match version {
        RECORD_FORMAT => {
            FilesRecord::decode(body)
                .map_err(|e| CodecError::Malformed(e.to_string()))?
                .files
        }
        LEGACY_FORMAT => legacy::read::<legacy::Files<'_>>(body)?.upgrade(),
        v => return Err(unreadable(v)),
    };
    records.into_iter().map(file_from_record).collect()
}

fn file_from_record(s: FileRecord) -> Result<(Arc<str>, FileCoverage), CodecError> {
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
                    Some(l) => BranchArm::Label(l.into()),
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
                name: f.name.into(),
                start_line: f.start_line,
                end_line: f.end_line,
                hits: f.hits,
            })
            .collect(),
    );
    let tests = s
        .tests
        .into_iter()
        .map(|t| {
            let lines = RoaringBitmap::deserialize_from(&t.lines[..])
                .map_err(|e| CodecError::Malformed(format!("test lines of {}: {e}", s.path)))?;
            Ok((Arc::<str>::from(t.test), lines))
        })
        .collect::<Result<Vec<_>, CodecError>>()?;
    file.set_tests(tests);
    Ok((Arc::from(s.path), file))
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
        assert_eq!(bytes[0], RECORD_FORMAT);
        let back = decode_files(&bytes).unwrap();
        assert_eq!(&*back[0].0, "src/a.c");
        assert_eq!(back[0].1, f);

        assert!(matches!(
            decode_files(&bytes[..bytes.len() / 2]),
            Err(CodecError::Malformed(_))
        ));
        let mut newer = bytes.clone();
        newer[0] = RECORD_FORMAT + 1;
        assert!(matches!(
            decode_files(&newer),
            Err(CodecError::NewerFormat(_))
        ));
        assert!(matches!(decode_files(&[]), Err(CodecError::Empty)));
    }

    #[test]
    fn a_record_with_fields_this_build_does_not_know_still_reads() {
        let run = RunRecord {
            run_id: "r".into(),
            project: "acme/x".into(),
            completed_at_ms: Some(7),
            ..RunRecord::default()
        };
        let mut bytes = encode(&run);
        // Field 99 (a later release's), length-delimited, "new".
        bytes.extend_from_slice(&[0x9a, 0x06, 3, b'n', b'e', b'w']);
        assert_eq!(decode::<RunRecord>(&bytes).unwrap(), run);
        // And a record that lacks fields (an earlier release's) gets their defaults.
        let bare = [RECORD_FORMAT, 0x0a, 1, b'r'];
        let back = decode::<RunRecord>(&bare).unwrap();
        assert_eq!(back.run_id, "r");
        assert_eq!(back.completed_at_ms, None);
        assert!(back.expected_shards.is_empty());
    }

    #[test]
    fn the_first_releases_records_read_as_todays() {
        use crate::persist::records::{TestCaseRecord, TestStatus};
        // A shard record as the first release wrote it (postcard): shard "s1", expected,
        // attempt 2, last_seq 300, finished at 5, telemetry 1 passed, 2 failed, 0, 0, no
        // duration, 9 bytes of memory, platform "x", one test "c"."t" errored in 1.5 s.
        let mut bytes = vec![LEGACY_FORMAT, 2, b's', b'1', 1, 2, 0xac, 0x02, 1, 5];
        bytes.extend_from_slice(&[1, 1, 2, 0, 0, 0, 9, 1, b'x']);
        bytes.extend_from_slice(&[1, 1, b'c', 1, b't', 3, 1, 0x80, 0xca, 0xb5, 0xee, 0x01]);
        let shard: ShardRecord = decode(&bytes).unwrap();
        assert_eq!(
            (shard.shard_id.as_str(), shard.expected, shard.attempt),
            ("s1", true, 2)
        );
        assert_eq!((shard.last_seq, shard.finished_at_ms), (300, Some(5)));
        let t = shard.telemetry.unwrap();
        assert_eq!((t.passed, t.failed, t.peak_memory_bytes), (1, 2, 9));
        assert_eq!(t.duration_ms, None);
        assert_eq!(
            t.tests,
            [TestCaseRecord {
                suite: "c".into(),
                name: "t".into(),
                status: TestStatus::Errored as i32,
                duration_ns: 1_500_000_000,
                assertions: None,
            }]
        );
        // Cut short, it is an error, never a record with made-up fields.
        assert!(matches!(
            decode::<ShardRecord>(&bytes[..bytes.len() - 1]),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode::<ShardRecord>(&[3, 0]),
            Err(CodecError::UnknownFormat(3))
        ));
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
        let files = encode_files([("b.c", &FileCoverage::default())]);
        let batch = decode_delta(&files, None).unwrap();
        assert_eq!(batch.paths().collect::<Vec<_>>(), ["b.c"]);
    }
}
