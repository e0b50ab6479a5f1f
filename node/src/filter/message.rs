//! The message as filters see and change it: the header fields split out
//! (name, raw value with its folding) and the body, and the edits filters
//! ask for (add, insert, change or remove a field; replace the body),
//! applied before the next filter runs.
//!
//! Values coming from a filter are normalised to CRLF folding with a
//! leading white space on every continuation line, so that no filter can
//! end the header early or smuggle a bare CR or LF into the queued bytes.

/// One change a filter asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Edit {
    /// A field after the existing ones.
    Append { name: String, value: String },
    /// A field at `index` (0 = the top).
    Insert { index: usize, name: String, value: String },
    /// The `index`-th (1-based) field named `name` gets `value`; `None`
    /// removes it. Without such a field, a value is appended (Sendmail's
    /// `smfi_chgheader` does the same).
    Change {
        name: String,
        index: usize,
        value: Option<String>,
    },
    /// Every field named `name` goes.
    Remove { name: String },
    /// The body (after the blank line) becomes these bytes.
    ReplaceBody(Vec<u8>),
}

/// One header field as received: raw bytes, so that 8-bit header text
/// survives edits of other fields untouched.
#[derive(Debug)]
pub struct Field {
    pub name: Vec<u8>,
    /// After the colon: leading space and CRLF folding kept, no final CRLF.
    pub value: Vec<u8>,
    /// False for a line that is not a field (no colon), kept as it was.
    colon: bool,
}

impl Field {
    fn new(name: &str, value: String) -> Field {
        Field {
            name: name.as_bytes().to_vec(),
            value: value.into_bytes(),
            colon: true,
        }
    }

    fn is(&self, name: &str) -> bool {
        self.colon && self.name.eq_ignore_ascii_case(name.as_bytes())
    }
}

/// A message cut into header fields and body.
#[derive(Debug)]
pub struct Parsed {
    pub fields: Vec<Field>,
    pub body: Vec<u8>,
}

impl Parsed {
    /// Splits `message` at the first empty line.
    pub fn new(message: &[u8]) -> Parsed {
        let (head, body) = match find(message, b"\r\n\r\n") {
            Some(i) => (&message[..i + 2], message[i + 4..].to_vec()),
            None if message.starts_with(b"\r\n") => (&message[..0], message[2..].to_vec()),
            None => (message, Vec::new()),
        };
        let mut fields: Vec<Field> = Vec::new();
        let mut lines: Vec<&[u8]> = head.split(|&b| b == b'\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        for line in lines {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match (line.starts_with(b" ") || line.starts_with(b"\t"), fields.last_mut()) {
                (true, Some(field)) => {
                    field.value.extend_from_slice(b"\r\n");
                    field.value.extend_from_slice(line);
                }
                _ => match memchr::memchr(b':', line) {
                    Some(i) => fields.push(Field {
                        name: line[..i].to_vec(),
                        value: line[i + 1..].to_vec(),
                        colon: true,
                    }),
                    None => fields.push(Field {
                        name: line.to_vec(),
                        value: Vec::new(),
                        colon: false,
                    }),
                },
            }
        }
        Parsed { fields, body }
    }

    /// The message bytes again.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 80 * self.fields.len() + 2);
        for field in &self.fields {
            out.extend_from_slice(&field.name);
            if field.colon {
                out.push(b':');
            }
            out.extend_from_slice(&field.value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Applies `edits` in order; edits with a bad field name are skipped
    /// (and counted in the result) rather than written.
    pub fn apply(&mut self, edits: Vec<Edit>) -> usize {
        let mut skipped = 0;
        for edit in edits {
            match edit {
                Edit::Append { name, value } if valid_name(&name) => self.fields.push(Field::new(&name, fold(&value))),
                Edit::Insert { index, name, value } if valid_name(&name) => {
                    let index = index.min(self.fields.len());
                    self.fields.insert(index, Field::new(&name, fold(&value)));
                }
                Edit::Change { name, index, value } if valid_name(&name) => {
                    let position = self
                        .fields
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| f.is(&name))
                        .nth(index.saturating_sub(1))
                        .map(|(i, _)| i);
                    match (position, value) {
                        (Some(i), Some(value)) => self.fields[i].value = fold(&value).into_bytes(),
                        (Some(i), None) => {
                            self.fields.remove(i);
                        }
                        // As Sendmail: changing a field that is not there adds it.
                        (None, Some(value)) => self.fields.push(Field::new(&name, fold(&value))),
                        (None, None) => {}
                    }
                }
                Edit::Remove { name } => self.fields.retain(|f| !f.is(&name)),
                Edit::ReplaceBody(body) => self.body = body,
                _ => skipped += 1,
            }
        }
        skipped
    }

    /// The first field named `name`, unfolded and trimmed.
    pub fn get(&self, name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|f| f.is(name))
            .map(|f| String::from_utf8_lossy(&f.value).replace("\r\n", "").trim().to_owned())
    }
}

/// RFC 5322 field name: printable ASCII without colon, 1 to 200 octets.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 200 && name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// A value from a filter as wire text: one leading space, CRLF line ends,
/// continuation lines starting with white space, no empty lines, no NUL.
pub fn fold(value: &str) -> String {
    let value = value.replace('\0', "");
    let mut out = String::with_capacity(value.len() + 2);
    let mut lines = value
        .split(['\n', '\r'])
        .map(|l| l.trim_end())
        .filter(|l| !l.trim().is_empty());
    if let Some(first) = lines.next() {
        out.push(' ');
        out.push_str(first.trim_start());
    }
    for line in lines {
        out.push_str("\r\n");
        if !line.starts_with([' ', '\t']) {
            out.push('\t');
        }
        out.push_str(line);
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"Received: from x\r\n\tby y\r\nSubject: hi\r\nX-Spam: yes\r\n\r\nbody\r\n";

    #[test]
    fn round_trip_keeps_bytes() {
        assert_eq!(Parsed::new(MESSAGE).to_bytes(), MESSAGE);
        let parsed = Parsed::new(MESSAGE);
        assert_eq!(parsed.fields.len(), 3);
        assert_eq!(parsed.fields[0].value, b" from x\r\n\tby y");
        assert_eq!(parsed.get("subject").as_deref(), Some("hi"));
    }

    #[test]
    fn edits_apply_in_order() {
        let mut parsed = Parsed::new(MESSAGE);
        let skipped = parsed.apply(vec![
            Edit::Remove { name: "x-spam".into() },
            Edit::Append {
                name: "X-Score".into(),
                value: "1.5".into(),
            },
            Edit::Insert {
                index: 0,
                name: "X-Top".into(),
                value: "a\nb".into(),
            },
            Edit::Change {
                name: "Subject".into(),
                index: 1,
                value: Some("*** SPAM *** hi".into()),
            },
            Edit::Append {
                name: "Bad Name".into(),
                value: "x".into(),
            },
            Edit::ReplaceBody(b"new\r\n".to_vec()),
        ]);
        assert_eq!(skipped, 1);
        assert_eq!(
            String::from_utf8(parsed.to_bytes()).unwrap(),
            "X-Top: a\r\n\tb\r\nReceived: from x\r\n\tby y\r\nSubject: *** SPAM *** hi\r\nX-Score: 1.5\r\n\r\nnew\r\n"
        );
    }

    #[test]
    fn changing_a_missing_field_adds_it() {
        let mut parsed = Parsed::new(MESSAGE);
        parsed.apply(vec![Edit::Change {
            name: "X-Spam-Flag".into(),
            index: 1,
            value: Some("YES".into()),
        }]);
        assert_eq!(parsed.get("x-spam-flag").as_deref(), Some("YES"));
    }

    #[test]
    fn filter_values_cannot_end_the_header() {
        assert_eq!(fold("a\r\n\r\nInjected: 1\r\n"), " a\r\n\tInjected: 1");
        assert_eq!(fold("x\ry\0"), " x\r\n\ty");
    }

    #[test]
    fn eight_bit_and_odd_lines_survive_edits() {
        let message = b"From foo\r\nSubject: \xe9t\xe9\r\n\r\nb\r\n";
        let mut parsed = Parsed::new(message);
        assert_eq!(parsed.to_bytes(), message);
        parsed.apply(vec![Edit::Append {
            name: "X-A".into(),
            value: "1".into(),
        }]);
        assert_eq!(
            parsed.to_bytes(),
            b"From foo\r\nSubject: \xe9t\xe9\r\nX-A: 1\r\n\r\nb\r\n"
        );
    }

    #[test]
    fn message_without_body() {
        let parsed = Parsed::new(b"Subject: x\r\n");
        assert_eq!(parsed.fields.len(), 1);
        assert!(parsed.body.is_empty());
    }
}
