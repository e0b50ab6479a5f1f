//! The command-line parser must never panic, and whatever it rejects must map
//! to a well-formed error reply (checks in tern_smtp::fuzzing, which a
//! unit test also runs over the committed corpus).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tern_smtp::fuzzing::command_line(data));
