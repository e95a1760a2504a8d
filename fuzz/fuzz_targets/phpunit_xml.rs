//! Any input to the PHPUnit XML readers (index and file report): an error or a report, never
//! a panic; a file report's tests cover only lines it says ran.
#![no_main]

use covd::formats::phpunit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = phpunit::read_index(data);
    if let Ok(file) = phpunit::read_file(data, "/src") {
        for (_, lines) in &file.tests {
            assert!(lines.is_subset(&file.covered));
        }
    }
});
