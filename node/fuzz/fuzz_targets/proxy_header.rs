//! The PROXY protocol header parser must never panic, never ask for more than
//! its bound, and agree with itself on every prefix (checks in
//! tern_smtp::fuzzing, which a unit test also runs over the corpus).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_smtp::fuzzing::proxy_header(data));
