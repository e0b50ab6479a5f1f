//! Incremental decoder for the content that follows `DATA` (RFC 5321 4.1.1.4,
//! 4.5.2): dot-unstuffing, the `<CRLF>.<CRLF>` end marker, and the checks
//! that make SMTP smuggling impossible.
//!
//! Only a `.` alone on a line whose previous line ended in a real CRLF ends
//! the message. Any bare CR or bare LF taints the message instead of ending
//! a line, so `\n.\n`, `\r.\r`, `\n.\r\n`, `\r\n.\n`, `\r.\r\n` and the like
//! are plain content; the session rejects a tainted message once the real
//! end marker arrives, so one message can never be split into two.

/// Maximum text line length including CRLF (RFC 5321 4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line that follows a real CRLF (or of the content).
    LineStart,
    /// Saw `.` at line start.
    Dot,
    /// Saw `.` CR at line start.
    DotCr,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line.
    Cr,
}

/// Result of a completed DATA phase.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DataOutcome {
    /// Unstuffed content with CRLF line endings; truncated if `oversize`.
    pub body: Vec<u8>,
    /// Total unstuffed size seen, including any discarded part.
    pub size: u64,
    /// A bare CR or LF occurred somewhere.
    pub bare_cr_lf: bool,
    /// Some line was longer than [`MAX_TEXT_LINE`] octets including CRLF.
    pub line_too_long: bool,
    /// `size` exceeded the limit; the excess was discarded.
    pub oversize: bool,
    /// Buffering stopped because the memory budget could not cover it
    /// ([`DataDecoder::discard`]); the content was discarded.
    pub over_budget: bool,
}

/// Feeds raw bytes in any chunking; stops exactly after the end marker.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    max_size: u64,
    /// Content octets of the current line so far (stuffing dot excluded).
    line_len: usize,
    out: DataOutcome,
}

impl DataDecoder {
    pub fn new(max_size: u64) -> Self {
        Self::with_capacity(max_size, 0)
    }

    /// As [`DataDecoder::new`], with room for `capacity` content bytes
    /// (the declared SIZE, already covered by a memory reservation).
    pub fn with_capacity(max_size: u64, capacity: usize) -> Self {
        DataDecoder {
            state: State::LineStart,
            max_size,
            line_len: 0,
            out: DataOutcome {
                body: Vec::with_capacity(capacity),
                ..DataOutcome::default()
            },
        }
    }

    /// Bytes allocated for the content so far (what a memory reservation
    /// must cover).
    pub fn capacity(&self) -> usize {
        self.out.body.capacity()
    }

    /// Drops the content buffered so far and buffers no more; decoding goes
    /// on to the end marker, and the outcome says `over_budget`.
    pub fn discard(&mut self) {
        self.out.over_budget = true;
        self.out.body = Vec::new();
    }

    /// Consumes bytes from `input`. Returns how many were consumed and
    /// whether the end marker was reached; bytes after the marker are left
    /// alone (pipelined commands).
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::LineStart => {
                    if b == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Mid;
                    }
                }
                State::Dot => match b {
                    b'\r' => {
                        self.state = State::DotCr;
                        i += 1;
                    }
                    // A leading dot with more on the line is removed
                    // (RFC 5321 4.5.2); a bare LF here is handled by Mid.
                    _ => self.state = State::Mid,
                },
                State::DotCr => {
                    if b == b'\n' {
                        return (i + 1, true);
                    }
                    // `.` CR without LF: bare CR. Drop the dot as unstuffing
                    // would and keep the CR as content.
                    self.out.bare_cr_lf = true;
                    self.emit(b"\r");
                    self.state = State::Mid;
                }
                State::Mid => match b {
                    b'\r' => {
                        self.state = State::Cr;
                        i += 1;
                    }
                    b'\n' => {
                        // Bare LF: content, never a line end, so a following
                        // ".\r\n" cannot end the message.
                        self.out.bare_cr_lf = true;
                        self.emit(b"\n");
                        self.line_len = 0;
                        i += 1;
                    }
                    _ => {
                        let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                        self.emit(&input[i..i + run]);
                        i += run;
                    }
                },
                State::Cr => match b {
                    b'\n' => {
                        self.emit(b"\r\n");
                        self.line_len = 0;
                        self.state = State::LineStart;
                        i += 1;
                    }
                    b'\r' => {
                        // The first CR was bare; this one may still be real.
                        self.out.bare_cr_lf = true;
                        self.emit(b"\r");
                        i += 1;
                    }
                    _ => {
                        self.out.bare_cr_lf = true;
                        self.emit(b"\r");
                        self.state = State::Mid;
                    }
                },
            }
        }
        (input.len(), false)
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.line_len += bytes.len();
        if self.line_len > MAX_TEXT_LINE {
            self.out.line_too_long = true;
        }
        self.out.size = self.out.size.saturating_add(bytes.len() as u64);
        if self.out.size > self.max_size {
            // Keep reading to the end marker but stop buffering.
            self.out.oversize = true;
            self.out.body = Vec::new();
        } else if !self.out.over_budget {
            // Grow by doubling, but never past max_size: a memory budget of
            // one max_size message always covers one message.
            let body = &mut self.out.body;
            let need = body.len() + bytes.len();
            if need > body.capacity() {
                let max = usize::try_from(self.max_size).unwrap_or(usize::MAX);
                let cap = body.capacity().saturating_mul(2).min(max).max(need);
                body.reserve_exact(cap - body.len());
            }
            body.extend_from_slice(bytes);
        }
    }

    /// The outcome; call after `feed` reported the end marker.
    pub fn finish(self) -> DataOutcome {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` one byte at a time and in one go; both must agree.
    fn decode(input: &[u8], max: u64) -> (Option<DataOutcome>, usize) {
        let mut whole = DataDecoder::new(max);
        let (n, done) = whole.feed(input);
        let mut bytewise = DataDecoder::new(max);
        let mut m = 0;
        let mut done2 = false;
        while m < input.len() && !done2 {
            let (k, d) = bytewise.feed(&input[m..m + 1]);
            m += k;
            done2 = d;
        }
        assert_eq!((n, done), (m, done2), "chunking changed the result");
        if done {
            let a = whole.finish();
            assert_eq!(a, bytewise.finish());
            (Some(a), n)
        } else {
            (None, n)
        }
    }

    #[test]
    fn buffer_never_grows_past_the_size_limit() {
        let mut d = DataDecoder::new(100_000);
        let line = format!("{}\r\n", "x".repeat(98));
        for _ in 0..1000 {
            d.feed(line.as_bytes());
            assert!(d.capacity() <= 100_000, "{}", d.capacity());
        }
        let (_, done) = d.feed(b".\r\n");
        assert!(done);
        let out = d.finish();
        assert_eq!(out.body.len(), 100_000);
        assert!(!out.oversize);
    }

    #[test]
    fn simple_message_and_pipelined_tail() {
        let (out, n) = decode(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n", 1000);
        let out = out.expect("ends");
        assert_eq!(out.body, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(n, 24);
        assert!(!out.bare_cr_lf && !out.line_too_long && !out.oversize);
    }

    #[test]
    fn empty_message() {
        let (out, n) = decode(b".\r\n", 10);
        assert_eq!(out.expect("ends").body, b"");
        assert_eq!(n, 3);
    }

    #[test]
    fn dot_unstuffing() {
        let (out, _) = decode(b"..\r\n..x\r\n.y\r\na.b\r\n...\r\n.\r\n", 1000);
        assert_eq!(out.expect("ends").body, b".\r\n.x\r\ny\r\na.b\r\n..\r\n");
    }

    #[test]
    fn incomplete_is_not_done() {
        assert!(decode(b"abc\r\n.\r", 100).0.is_none());
        assert!(decode(b"abc\r\n.", 100).0.is_none());
    }

    #[test]
    fn smuggling_variants_do_not_end_the_message() {
        for v in [
            &b"\n.\n"[..],
            b"\r.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n.\rX",
            b"\n.\r",
        ] {
            let mut msg = b"a".to_vec();
            msg.extend_from_slice(v);
            msg.extend_from_slice(b"MAIL FROM:<evil@x>\r\n");
            let (out, n) = decode(&msg, 1000);
            assert!(out.is_none(), "{v:?} ended the message");
            assert_eq!(n, msg.len());
            msg.extend_from_slice(b"tail\r\n.\r\n");
            let (out, n) = decode(&msg, 1000);
            let out = out.expect("real end marker ends it");
            assert!(out.bare_cr_lf, "{v:?} not flagged");
            assert_eq!(n, msg.len());
        }
    }

    #[test]
    fn bare_cr_or_lf_anywhere_taints() {
        for m in [
            &b"a\rb\r\n.\r\n"[..],
            b"a\nb\r\n.\r\n",
            b"a\r\r\n.\r\n",
            b"\n.\r\n.\r\n",
        ] {
            assert!(decode(m, 100).0.expect("ends").bare_cr_lf, "{m:?}");
        }
    }

    #[test]
    fn line_length_limit() {
        let mut ok = vec![b'x'; 998];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(!decode(&ok, 10_000).0.expect("ends").line_too_long);
        // A stuffing dot does not count (RFC 5321 4.5.3.1.6).
        let mut stuffed = b".".to_vec();
        stuffed.extend_from_slice(&ok);
        stuffed[1] = b'.';
        assert!(!decode(&stuffed, 10_000).0.expect("ends").line_too_long);
        let mut long = vec![b'x'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        let out = decode(&long, 10_000).0.expect("ends");
        assert!(out.line_too_long);
        assert!(!out.bare_cr_lf);
    }

    #[test]
    fn oversize_discards_but_finds_end() {
        let mut m = vec![b'x'; 50];
        m.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (out, n) = decode(&m, 20);
        let out = out.expect("ends");
        assert!(out.oversize);
        assert!(out.body.is_empty());
        assert_eq!(out.size, 52);
        assert_eq!(n, m.len() - 6);
        let (out, _) = decode(b"12345678\r\n.\r\n", 10);
        assert!(!out.expect("ends").oversize);
    }
}
