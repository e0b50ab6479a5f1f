//! The checks the cargo-fuzz targets (node/fuzz) run on each input. They live
//! in this library so that the workspace build compiles them and the unit test
//! below replays the committed corpus in every test run; the fuzz targets are
//! thin wrappers, and a crash the fuzzer finds becomes a corpus file here.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;

use crate::command;
use crate::policy::{RelayPolicy, SessionConfig};
use crate::session::{Output, Session, MAX_COMMAND_LINE};

/// The command-line parser must never panic, and whatever it rejects must map
/// to a well-formed, single-line error reply.
pub fn command_line(data: &[u8]) {
    if let Err(e) = command::parse(data) {
        let reply = e.reply();
        assert!(reply.is_error());
        let wire = reply.to_bytes();
        assert!(wire.ends_with(b"\r\n"));
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = command::xtext_decode(s);
    }
}

/// Drives a whole session with arbitrary client bytes, split into reads of
/// `data[0] + 1` bytes (so the fuzzer explores chunking as well as content;
/// the committed corpus files start with `@`, 65-byte reads). Checks: no
/// panic, bounded buffering, replies are well-formed, and every message
/// enqueued from DATA was ended by a real CRLF.CRLF with no bare CR/LF inside
/// (the smuggling guarantee). Returns how many messages were enqueued.
pub fn session(data: &[u8]) -> usize {
    let Some((&chunk, data)) = data.split_first() else {
        return 0;
    };
    let chunk = usize::from(chunk) + 1;
    let config = Arc::new(SessionConfig {
        hostname: "mx.fuzz".into(),
        max_message_size: 4096,
        max_recipients: 100,
        max_errors: 50,
        relay: RelayPolicy {
            local_domains: vec!["example.test".into()],
            relay_domains: vec![],
            relay_networks: vec![],
        },
        ..SessionConfig::default()
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
    let mut enqueued = 0;
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
                Output::Verify { .. } | Output::Screen { .. } => {
                    unreachable!("verify_recipients and screen_recipients are off")
                }
                Output::Authenticate { .. } => unreachable!("AUTH is refused on an MX listener"),
                Output::Enqueue { envelope, body, .. } => {
                    assert!(!envelope.recipients.is_empty());
                    assert!(body.starts_with(b"Received: "));
                    if after_354 {
                        crlf_only(&body);
                    }
                    after_354 = false;
                    enqueued += 1;
                    session.enqueue_result(Ok(())).write_to(&mut out);
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
    enqueued
}

/// The PROXY header parser must never panic, must never ask for bytes past
/// [`proxy::MAX_HEADER`], and a parsed header must lie within the input;
/// parsing any prefix of the input must agree (incomplete, or the same).
pub fn proxy_header(data: &[u8]) {
    use crate::proxy::{self, Parsed};
    let whole = proxy::parse(data);
    if let Ok(Parsed::Done(_, n)) = &whole {
        assert!(*n <= data.len() && *n <= proxy::MAX_HEADER);
    }
    if let Ok(Parsed::Incomplete(more)) = &whole {
        assert!(*more >= 1 && data.len() + more <= proxy::MAX_HEADER);
    }
    for cut in 0..data.len().min(proxy::MAX_HEADER) {
        match (proxy::parse(&data[..cut]), &whole) {
            (Ok(Parsed::Incomplete(_)), _) => {}
            (Ok(Parsed::Done(h, n)), Ok(Parsed::Done(h2, n2))) => assert_eq!((h, n), (*h2, *n2)),
            (Err(_), Err(_)) => {}
            (prefix, whole) => panic!("prefix of {cut} bytes gave {prefix:?}, the whole input {whole:?}"),
        }
    }
}

/// A message that came through DATA has CRLF line endings only and ends with
/// CRLF: a bare CR or LF would mean the smuggling check was bypassed.
fn crlf_only(body: &[u8]) {
    assert!(body.ends_with(b"\r\n"));
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\n' => assert!(i > 0 && body[i - 1] == b'\r', "bare LF at {i}"),
            b'\r' => assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            _ => {}
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;

    fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../node/fuzz/corpus")
            .join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                (
                    path.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&path).unwrap(),
                )
            })
            .collect();
        files.sort();
        assert!(!files.is_empty(), "empty corpus {}", dir.display());
        files
    }

    #[test]
    fn proxy_corpus_replays() {
        for (_, data) in corpus("proxy_header") {
            super::proxy_header(&data);
        }
    }

    #[test]
    fn command_corpus_replays() {
        for (_, data) in corpus("smtp_command") {
            super::command_line(&data);
        }
    }

    /// Every corpus session runs through the checks; the local transactions
    /// enqueue their messages and the smuggling attempts enqueue none (the
    /// RFC 5321 examples relay from an address outside relay_networks).
    #[test]
    fn session_corpus_replays() {
        for (name, data) in corpus("smtp_session") {
            let enqueued = super::session(&data);
            if name.starts_with("smuggle_") {
                assert_eq!(enqueued, 0, "{name}");
            }
            if name == "pipelined_local" || name == "bdat_chunks" {
                assert!(enqueued >= 1, "{name}");
            }
        }
    }
}
