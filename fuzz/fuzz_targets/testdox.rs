//! Any input to the testdox XML reader: an error or test cases, never a panic.
#![no_main]

use covd::formats::testdox;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = testdox::read(data, |_| {});
    let _ = testdox::detect(data);
});
