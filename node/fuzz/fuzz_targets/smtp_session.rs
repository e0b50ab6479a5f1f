//! Drives a whole session with arbitrary client bytes split into reads at
//! fuzzer-chosen points (checks in tern_smtp::fuzzing, which a unit
//! test also runs over the committed corpus).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern_smtp::fuzzing::session(data);
});
