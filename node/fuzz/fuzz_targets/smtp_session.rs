//! Drives a whole session with arbitrary client bytes, split into reads at
//! fuzzer-chosen points. Checks: no panic, bounded buffering, replies are
//! well-formed, and every enqueued message was ended by a real CRLF.CRLF
//! with no bare CR/LF inside (the smuggling guarantee).
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tern_node::smtp::session::{Output, Session, MAX_COMMAND_LINE};
use tern_node::smtp::{RelayPolicy, SmtpConfig};

fuzz_target!(|data: &[u8]| {
    // First byte: how many bytes per read (1..=256), so the fuzzer explores
    // chunking as well as content. The committed corpus files start with `@`
    // (65-byte reads).
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let config = Arc::new(SmtpConfig {
        hostname: "mx.fuzz".into(),
        max_message_size: 4096,
        max_recipients: 100,
        max_errors: 50,
        relay: RelayPolicy {
            local_domains: vec!["example.test".into()],
            relay_domains: vec![],
            relay_networks: vec![],
        },
        ..SmtpConfig::default()
    });
    let peer: SocketAddr = ([192, 0, 2, 1], 25).into();
    let mut n = 0u64;
    let mut session = Session::new(
        config,
        peer,
        false,
        Box::new(move || {
            n += 1;
            format!("F{n}")
        }),
    );
    let mut input = BytesMut::new();
    let mut out = Vec::new();
    session.greeting().write_to(&mut out);
    let mut pos = 0;
    // The message being enqueued came from DATA (the last reply was 354).
    let mut after_354 = false;
    'outer: loop {
        loop {
            match session.next(&mut input) {
                Output::Reply(r) => {
                    assert!((200..600).contains(&r.code));
                    after_354 = r.code == 354;
                    r.write_to(&mut out);
                }
                Output::NeedInput => break,
                Output::Close => break 'outer,
                Output::StartTls => unreachable!("STARTTLS is not offered without TLS config"),
                Output::Verify { .. } => unreachable!("verify_recipients is off"),
                Output::Authenticate { .. } => unreachable!("AUTH is refused on an MX listener"),
                Output::Enqueue { envelope, body, .. } => {
                    assert!(!envelope.recipients.is_empty());
                    assert!(body.starts_with(b"Received: "));
                    if after_354 {
                        check_crlf_only(&body);
                    }
                    after_354 = false;
                    let r = session.enqueue_result(Ok(()));
                    r.write_to(&mut out);
                }
            }
        }
        assert!(input.len() < MAX_COMMAND_LINE + chunk);
        if pos >= data.len() {
            break;
        }
        let end = (pos + chunk).min(data.len());
        input.extend_from_slice(&data[pos..end]);
        pos = end;
    }
});

/// A message that came through DATA has CRLF line endings only and ends with
/// CRLF: a bare CR or LF would mean the smuggling check was bypassed.
fn check_crlf_only(body: &[u8]) {
    assert!(body.ends_with(b"\r\n"));
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && body[i - 1] == b'\r', "bare LF at {i}"),
            b'\r' => assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            _ => {}
        }
    }
}
