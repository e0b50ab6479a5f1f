//! The command-line parser must never panic, and whatever it rejects must map
//! to a well-formed error reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_node::smtp::command;

fuzz_target!(|data: &[u8]| {
    match command::parse(data) {
        Ok(_) => {}
        Err(e) => {
            let reply = e.reply();
            assert!(reply.is_error());
            let wire = reply.to_bytes();
            assert!(wire.ends_with(b"\r\n"));
            assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = command::xtext_decode(s);
    }
});
