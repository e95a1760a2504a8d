//! Any bytes as a `covd.v1.Delta` to the daemon's hand-written wire reader: an error or files,
//! never a panic; every file it accepts is valid coverage (bounded, sorted lines), and whatever
//! it accepts, prost's generated decoder decodes too.
#![no_main]

use covd::rpc::convert::wire_delta_files;
use covd::rpc::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(files) = wire_delta_files(data) {
        assert!(proto::Delta::decode(data).is_ok(), "accepted what prost refuses");
        for (_, file) in files.to_files() {
            let lines: Vec<u32> = file.lines().iter().collect();
            assert!(lines.iter().all(|l| *l >= 1 && *l <= covd::model::MAX_LINE));
            assert_eq!(file.line_hits().count(), lines.len());
        }
    }
});
