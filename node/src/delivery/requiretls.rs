//! REQUIRETLS (RFC 8689) on delivery. The flag of a message sent with
//! `MAIL ... REQUIRETLS` is the `(REQUIRETLS)` comment in the Received
//! header the accepting session put on top ([`REQUIRETLS_MARK`]), so it
//! needs no new field in the queue's records or the Raft log. Such a
//! message goes only over TLS verified against the next hop's name (or a
//! `verify` policy's names), to a host that offers REQUIRETLS and gets the
//! parameter again; a host that does not offer it fails the recipients
//! with `5.7.30` (a verification failure defers, as for `verify`).

use tern_smtp::reply::Reply;
use tern_smtp::session::REQUIRETLS_MARK;

/// The message's topmost header field is a Received header with the mark.
pub fn required(message: &[u8]) -> bool {
    let head = &message[..message.len().min(4096)];
    if head.len() < 9 || !head[..9].eq_ignore_ascii_case(b"received:") {
        return false;
    }
    // The first field, unfolded: up to a line that does not start with WSP.
    let mut end = head.len();
    let mut i = 0;
    while let Some(p) = head[i..].windows(2).position(|w| w == b"\r\n") {
        let next = i + p + 2;
        if !matches!(head.get(next), Some(b' ' | b'\t')) {
            end = next;
            break;
        }
        i = next;
    }
    let field = &head[..end];
    field
        .windows(REQUIRETLS_MARK.len())
        .any(|w| w == REQUIRETLS_MARK.as_bytes())
}

/// The permanent failure when the next hop does not offer REQUIRETLS.
pub fn unsupported(peer: &str) -> Reply {
    Reply::synthetic(
        550,
        "5.7.30",
        format!("REQUIRETLS support required: next hop {peer} does not offer REQUIRETLS"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_counts_only_in_the_topmost_received_header() {
        let ours = b"Received: from c.test ([192.0.2.1])\r\n\tby mx.test (Tern) with ESMTPS id Q1\r\n\t(REQUIRETLS)\r\n\tfor <b@example.test>; date\r\nSubject: x\r\n\r\nbody\r\n";
        assert!(required(ours));
        let plain = b"Received: from c.test ([192.0.2.1])\r\n\tby mx.test (Tern) with ESMTPS id Q1; date\r\nSubject: (REQUIRETLS)\r\n\r\n";
        assert!(!required(plain), "a mark in another field is the sender's text");
        let lower = b"Received: from a\r\n\tby b; date\r\nReceived: from x\r\n\t(REQUIRETLS); date\r\n\r\n";
        assert!(!required(lower), "only the topmost (our own) Received header counts");
        assert!(!required(b"Subject: x\r\n\r\n"));
        assert!(!required(b""));
    }
}
