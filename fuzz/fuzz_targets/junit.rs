//! Any input to the JUnit XML reader: an error or test cases, never a panic.
#![no_main]

use covd::formats::junit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = junit::read(data, |_| {});
    let _ = junit::detect(data);
});
