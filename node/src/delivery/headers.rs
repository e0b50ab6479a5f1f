//! Reading header fields of a queued message.

/// First value of a header field in the message's header section.
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(message.len());
    let text = String::from_utf8_lossy(&message[..end]);
    let mut lines = text.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        if let Some((field, value)) = line.split_once(':') {
            if field.eq_ignore_ascii_case(name) {
                let mut v = value.trim().to_owned();
                while let Some(next) = lines.peek().filter(|l| l.starts_with([' ', '\t'])) {
                    v.push(' ');
                    v.push_str(next.trim());
                    lines.next();
                }
                return Some(v.trim_matches(['<', '>']).to_owned());
            }
        }
    }
    None
}
