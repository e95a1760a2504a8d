//! Any input to the clover reader: an error or records, never a panic; and every record it
//! accepts is a valid coverage file (sorted lines, bounded line numbers).
#![no_main]

use covd::formats::{self, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = formats::read(Format::Clover, data, |record| {
        let lines: Vec<u32> = record.file.lines().iter().collect();
        assert!(lines.iter().all(|l| *l >= 1 && *l <= covd::model::MAX_LINE));
        assert_eq!(record.file.line_hits().count(), lines.len());
        true
    });
});
