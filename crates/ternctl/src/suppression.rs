//! `ternctl suppression add|remove|list|import|export`, and the CSV form
//! of the list: `address,scope,class,reason,added,expires` (RFC 4180
//! quoting; a header row is optional on import; only `address` is
//! required; times as RFC 3339 or unix seconds, empty `expires`: never).

use serde_json::json;
use tern_model::shaping::MAX_SUPPRESSIONS_PER_WRITE;
use tern_proto::admin::*;

use crate::cli::SuppressionCommand;
use crate::connect::Client;
use crate::output::{print_json, print_table, time};

/// The CSV columns, in order.
pub const COLUMNS: [&str; 6] = ["address", "scope", "class", "reason", "added", "expires"];
/// Bytes of entries per import request at most (under gRPC's 4 MiB).
const MAX_REQUEST_BYTES: usize = 2 << 20;

pub async fn run(client: &mut Client, cmd: SuppressionCommand, json: bool) -> Result<(), tonic::Status> {
    let now = chrono::Utc::now().timestamp();
    match cmd {
        SuppressionCommand::Add {
            address,
            scope,
            reason,
            class,
            expires,
        } => {
            let entry = SuppressionEntry {
                address,
                scope: scope.unwrap_or_default(),
                class,
                reason,
                added: 0,
                expires: expires.map_or(0, |secs| now.saturating_add(secs as i64)),
            };
            let r = client
                .suppression_add(SuppressionAddRequest { entries: vec![entry] })
                .await?
                .into_inner();
            changed(json, "add", r.affected);
        }
        SuppressionCommand::Remove { address, scope } => {
            let r = client
                .suppression_remove(SuppressionRemoveRequest {
                    keys: vec![SuppressionKey {
                        scope: scope.unwrap_or_default(),
                        address,
                    }],
                })
                .await?
                .into_inner();
            if r.affected == 0 {
                return Err(tonic::Status::not_found("no such entry in that list"));
            }
            changed(json, "remove", r.affected);
        }
        SuppressionCommand::List { scope, limit, all } => {
            let r = client
                .suppression_list(SuppressionListRequest {
                    scope,
                    after: None,
                    limit,
                    include_expired: all,
                })
                .await?
                .into_inner();
            if json {
                print_json(&json!({
                    "entries": r.entries.iter().map(entry_json).collect::<Vec<_>>(),
                    "more": r.next.is_some(),
                }));
            } else {
                let rows: Vec<Vec<String>> = r
                    .entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.address.clone(),
                            if e.scope.is_empty() {
                                "(global)".into()
                            } else {
                                e.scope.clone()
                            },
                            e.class.clone(),
                            time(e.added),
                            if e.expires == 0 {
                                "never".into()
                            } else {
                                time(e.expires)
                            },
                            e.reason.clone(),
                        ]
                    })
                    .collect();
                print_table(&["ADDRESS", "SCOPE", "CLASS", "ADDED", "EXPIRES", "REASON"], &rows);
                if r.next.is_some() {
                    println!("(more entries: raise --limit or use export)");
                }
            }
        }
        SuppressionCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| tonic::Status::invalid_argument(format!("{}: {e}", file.display())))?;
            let entries =
                parse_csv(&text).map_err(|e| tonic::Status::invalid_argument(format!("{}: {e}", file.display())))?;
            let total = entries.len();
            let mut done = 0;
            let mut added = 0;
            for batch in batches(entries) {
                let n = batch.len();
                added += client
                    .suppression_add(SuppressionAddRequest { entries: batch })
                    .await
                    .map_err(|s| {
                        tonic::Status::new(s.code(), format!("{} (after {done} of {total} imported)", s.message()))
                    })?
                    .into_inner()
                    .affected;
                done += n;
                if total > MAX_SUPPRESSIONS_PER_WRITE {
                    eprintln!("import: {done}/{total}");
                }
            }
            changed(json, "import", added);
        }
        SuppressionCommand::Export { file, scope, all } => {
            let mut out = String::new();
            out.push_str(&COLUMNS.join(","));
            out.push('\n');
            let mut after = None;
            let mut count = 0u64;
            loop {
                let r = client
                    .suppression_list(SuppressionListRequest {
                        scope: scope.clone(),
                        after,
                        limit: MAX_SUPPRESSIONS_PER_WRITE as u32,
                        include_expired: all,
                    })
                    .await?
                    .into_inner();
                for e in &r.entries {
                    out.push_str(&csv_row(e));
                    count += 1;
                }
                match r.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            match file {
                Some(path) => {
                    std::fs::write(&path, out)
                        .map_err(|e| tonic::Status::internal(format!("{}: {e}", path.display())))?;
                    if json {
                        print_json(&json!({"op": "export", "entries": count, "file": path.display().to_string()}));
                    } else {
                        eprintln!("export: {count} entries to {}", path.display());
                    }
                }
                None => print_raw(&out),
            }
        }
    }
    Ok(())
}

fn changed(json: bool, op: &str, n: u64) {
    if json {
        print_json(&json!({"op": op, "affected": n}));
    } else {
        println!("suppression {op}: {n} entries");
    }
}

fn entry_json(e: &SuppressionEntry) -> serde_json::Value {
    json!({
        "address": e.address, "scope": e.scope, "class": e.class, "reason": e.reason,
        "added": e.added, "expires": e.expires,
    })
}

/// Requests of at most [`MAX_SUPPRESSIONS_PER_WRITE`] entries and
/// [`MAX_REQUEST_BYTES`].
fn batches(entries: Vec<SuppressionEntry>) -> Vec<Vec<SuppressionEntry>> {
    let mut out: Vec<Vec<SuppressionEntry>> = Vec::new();
    let mut bytes = 0;
    for e in entries {
        let size = e.address.len() + e.scope.len() + e.class.len() + e.reason.len() + 32;
        match out.last_mut() {
            Some(b) if b.len() < MAX_SUPPRESSIONS_PER_WRITE && bytes + size <= MAX_REQUEST_BYTES => {
                bytes += size;
                b.push(e);
            }
            _ => {
                bytes = size;
                out.push(vec![e]);
            }
        }
    }
    out
}

/// One CSV line of an entry (times in RFC 3339, `expires` empty for never).
pub fn csv_row(e: &SuppressionEntry) -> String {
    let t = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| s.to_string())
    };
    let fields = [
        e.address.clone(),
        e.scope.clone(),
        e.class.clone(),
        e.reason.clone(),
        t(e.added),
        if e.expires == 0 { String::new() } else { t(e.expires) },
    ];
    let mut line = fields.iter().map(|f| quote(f)).collect::<Vec<_>>().join(",");
    line.push('\n');
    line
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) || field.starts_with(' ') || field.ends_with(' ') {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// A CSV error, with the line it starts on.
#[derive(Debug, PartialEq, Eq)]
pub struct CsvError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for CsvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// Splits CSV text into records of fields, each with the line it starts
/// on (RFC 4180: quoted fields may hold commas, quotes as `""`, and line
/// breaks). Blank lines are skipped.
fn records(text: &str) -> Result<Vec<(usize, Vec<String>)>, CsvError> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut was_quoted = false;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    return Err(CsvError {
                        line: start,
                        reason: "a quoted field is not closed".into(),
                    });
                }
                fields.push(std::mem::take(&mut field));
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    c => {
                        if c == '\n' {
                            line += 1;
                        }
                        field.push(c);
                    }
                }
                continue;
            }
            match c {
                ',' => {
                    fields.push(std::mem::take(&mut field));
                    was_quoted = false;
                }
                '"' if field.trim().is_empty() && !was_quoted => {
                    field.clear();
                    quoted = true;
                    was_quoted = true;
                }
                '"' => {
                    return Err(CsvError {
                        line,
                        reason: "a quote inside an unquoted field (quote the whole field and double the quote)".into(),
                    })
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                c if was_quoted && !c.is_whitespace() => {
                    return Err(CsvError {
                        line,
                        reason: "text after a quoted field's closing quote".into(),
                    })
                }
                c => field.push(c),
            }
        }
        if !(fields.len() == 1 && fields[0].trim().is_empty()) {
            out.push((start, fields));
        }
    }
    Ok(out)
}

/// A time column: RFC 3339, unix seconds, or empty (0).
fn parse_time(column: &str, value: &str, line: usize) -> Result<i64, CsvError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(0);
    }
    if let Ok(n) = value.parse::<i64>() {
        if n >= 0 {
            return Ok(n);
        }
    }
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp())
        .map_err(|_| CsvError {
            line,
            reason: format!("{column}: {value:?} is not an RFC 3339 time (2026-12-07T10:00:00Z) or unix seconds"),
        })
}

/// The entries of an import file (see the module doc).
pub fn parse_csv(text: &str) -> Result<Vec<SuppressionEntry>, CsvError> {
    let mut rows = records(text)?;
    if rows.is_empty() {
        return Err(CsvError {
            line: 1,
            reason: "no entries".into(),
        });
    }
    if rows[0]
        .1
        .first()
        .is_some_and(|f| f.trim().eq_ignore_ascii_case("address"))
    {
        let (line, header) = &rows[0];
        let expected = &COLUMNS[..header.len().min(COLUMNS.len())];
        let got: Vec<String> = header.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        if got.len() > COLUMNS.len() || got != expected {
            return Err(CsvError {
                line: *line,
                reason: format!("the header must be (a prefix of) {}", COLUMNS.join(",")),
            });
        }
        rows.remove(0);
    }
    rows.into_iter()
        .map(|(line, f)| {
            if f.len() > COLUMNS.len() {
                return Err(CsvError {
                    line,
                    reason: format!("{} fields (at most {}: {})", f.len(), COLUMNS.len(), COLUMNS.join(",")),
                });
            }
            let get = |i: usize| f.get(i).map(|s| s.trim().to_owned()).unwrap_or_default();
            let address = get(0);
            let valid = !address.contains(char::is_whitespace)
                && address
                    .rsplit_once('@')
                    .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty());
            if !valid {
                return Err(CsvError {
                    line,
                    reason: format!("address: {address:?} is not a recipient address"),
                });
            }
            Ok(SuppressionEntry {
                address,
                scope: get(1),
                class: get(2),
                reason: f.get(3).cloned().unwrap_or_default(),
                added: parse_time("added", &get(4), line)?,
                expires: parse_time("expires", &get(5), line)?,
            })
        })
        .collect()
}

/// `print!` of a whole CSV document; a closed pipe ends the process as
/// [`crate::stdout_line`] does.
fn print_raw(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("ternctl: writing to stdout: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_csv(text).unwrap_err().to_string()
    }

    #[test]
    fn entries_round_trip_through_csv() {
        let e = SuppressionEntry {
            address: "bob@example.org".into(),
            scope: "shop.test".into(),
            class: "manual".into(),
            reason: "said \"stop\", twice\nby phone".into(),
            added: 1_796_601_600,
            expires: 0,
        };
        let text = format!("{}\n{}", COLUMNS.join(","), csv_row(&e));
        assert_eq!(parse_csv(&text).unwrap(), std::slice::from_ref(&e));
        assert!(csv_row(&e).starts_with(
            "bob@example.org,shop.test,manual,\"said \"\"stop\"\", twice\nby phone\",2026-12-07T00:00:00Z,\n"
        ));
    }

    #[test]
    fn short_rows_headerless_files_and_crlf_are_read() {
        let got = parse_csv("a@x.test\r\nb@x.test,,complaint,,1796601600,2026-12-08T00:00:00Z\r\n\r\n").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].address.as_str(), got[0].class.as_str(), got[0].expires),
            ("a@x.test", "", 0)
        );
        assert_eq!(
            (got[1].class.as_str(), got[1].added, got[1].expires),
            ("complaint", 1_796_601_600, 1_796_688_000)
        );
    }

    #[test]
    fn bad_input_names_the_line() {
        assert_eq!(err(""), "line 1: no entries");
        assert_eq!(
            err("address,scope\nnot-an-address\n"),
            "line 2: address: \"not-an-address\" is not a recipient address"
        );
        assert_eq!(
            err("a@x.test\nb@x.test,,,,yesterday\n"),
            "line 2: added: \"yesterday\" is not an RFC 3339 time (2026-12-07T10:00:00Z) or unix seconds"
        );
        assert!(err("a@x.test\n\"b@x.test,\n\n").starts_with("line 2: a quoted field is not closed"));
        assert!(err("a@x.test\nb@x.test,sh\"op\n").starts_with("line 2: a quote inside"));
        assert!(err("a@x.test,\"q\"x\n").starts_with("line 1: text after"));
        assert!(err("a@x.test,,,,,,extra\n").starts_with("line 1: 7 fields"));
        assert!(err("address,class\na@x.test\n").starts_with("line 1: the header must be"));
        // A multi-line quoted field moves the count on.
        assert!(err("a@x.test,,,\"two\nlines\"\nbad\n").starts_with("line 3: address"));
    }

    #[test]
    fn imports_are_split_into_bounded_requests() {
        let many: Vec<SuppressionEntry> = (0..MAX_SUPPRESSIONS_PER_WRITE + 1)
            .map(|i| SuppressionEntry {
                address: format!("u{i}@x.test"),
                ..SuppressionEntry::default()
            })
            .collect();
        let sizes: Vec<usize> = batches(many).iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_SUPPRESSIONS_PER_WRITE, 1]);
    }
}
