//! A milter client (the Sendmail mail filter protocol, version 6), replaying
//! one finished SMTP transaction to the milter: option negotiation,
//! CONNECT, HELO, MAIL, RCPT, DATA, each header field, end of headers, the
//! body in chunks of at most 65,535 octets, end of message, then QUIT.
//!
//! Every packet is a 4-octet big-endian length, a command letter and its
//! data (NUL-terminated strings). The milter answers each step (unless it
//! negotiated not to) with continue, accept, reject, tempfail, discard or a
//! reply code; at end of message it may first send modifications: add,
//! insert or change a header field, replace the body, quarantine. Changes to
//! the envelope (recipients, sender) are not offered in the negotiation.
//!
//! A reject or tempfail at any step, a recipient's included, refuses the
//! whole message: the filter runs after DATA, where one reply covers every
//! recipient.

use std::net::IpAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::message::{Edit, Parsed};
use super::{Address, Answer, Context, FilterError, Io, Verdict};
use tern_smtp::reply::Reply;

const VERSION: u32 = 6;

// Actions we let the milter take (SMFIF_*): add headers, change the body,
// change/delete headers, quarantine.
const SMFIF_ADDHDRS: u32 = 0x01;
const SMFIF_CHGBODY: u32 = 0x02;
const SMFIF_CHGHDRS: u32 = 0x10;
const SMFIF_QUARANTINE: u32 = 0x20;
const ACTIONS: u32 = SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_CHGHDRS | SMFIF_QUARANTINE;

// Protocol steps the milter may ask to skip (SMFIP_NO*) or not answer (SMFIP_NR_*).
const SMFIP_NOCONNECT: u32 = 0x1;
const SMFIP_NOHELO: u32 = 0x2;
const SMFIP_NOMAIL: u32 = 0x4;
const SMFIP_NORCPT: u32 = 0x8;
const SMFIP_NOBODY: u32 = 0x10;
const SMFIP_NOHDRS: u32 = 0x20;
const SMFIP_NOEOH: u32 = 0x40;
const SMFIP_NR_HDR: u32 = 0x80;
const SMFIP_NODATA: u32 = 0x200;
const SMFIP_SKIP: u32 = 0x400;
const SMFIP_NR_CONN: u32 = 0x1000;
const SMFIP_NR_HELO: u32 = 0x2000;
const SMFIP_NR_MAIL: u32 = 0x4000;
const SMFIP_NR_RCPT: u32 = 0x8000;
const SMFIP_NR_DATA: u32 = 0x10000;
const SMFIP_NR_EOH: u32 = 0x40000;
const SMFIP_NR_BODY: u32 = 0x80000;
/// Every step flag above, plus NOUNKNOWN/NR_UNKN/RCPT_REJ (we never send
/// unknown commands or rejected recipients, so those cost nothing).
const PROTOCOL: u32 = 0xFFFFF;

/// Largest body chunk (SMFIC_BODY) and largest packet we accept.
const CHUNK: usize = 65_535;
const MAX_PACKET: usize = 1024 * 1024;
/// Modifications read at end of message before we call the milter broken.
const MAX_MODIFICATIONS: usize = 10_000;
/// Largest replacement body a milter may send (SMFIR_REPLBODY packets).
const MAX_NEW_BODY: usize = 64 * 1024 * 1024;

/// One milter response packet.
struct Packet {
    command: u8,
    data: Vec<u8>,
}

/// What a step's answer means for the conversation.
enum Step {
    Continue,
    /// Stop sending body chunks (SMFIS_SKIP).
    Skip,
    /// Done: the milter's verdict (accept, refuse, discard).
    Done(Verdict),
}

pub async fn check(address: &Address, context: &Context<'_>, message: &[u8]) -> Result<Answer, FilterError> {
    let mut conn = address.connect().await?;
    let result = conversation(&mut conn, context, message).await;
    // QUIT is a courtesy: the milter closes its side in any case.
    let _ = write_packet(&mut conn, b'Q', &[]).await;
    result
}

async fn conversation(conn: &mut Box<dyn Io>, context: &Context<'_>, message: &[u8]) -> Result<Answer, FilterError> {
    let mut negotiate = Vec::with_capacity(12);
    negotiate.extend_from_slice(&VERSION.to_be_bytes());
    negotiate.extend_from_slice(&ACTIONS.to_be_bytes());
    negotiate.extend_from_slice(&PROTOCOL.to_be_bytes());
    write_packet(conn, b'O', &negotiate).await?;
    let reply = read_packet(conn).await?;
    if reply.command != b'O' || reply.data.len() < 12 {
        return Err(protocol("no option negotiation answer"));
    }
    let word = |i: usize| u32::from_be_bytes([reply.data[i], reply.data[i + 1], reply.data[i + 2], reply.data[i + 3]]);
    let version = word(0);
    if version < 2 {
        return Err(protocol(&format!("milter speaks version {version}")));
    }
    let actions = word(4) & ACTIONS;
    let flags = word(8) & PROTOCOL;
    let skipped = |flag: u32| flags & flag != 0;

    let envelope = context.envelope;
    macros(conn, b'C', &[("j", context.hostname), ("{daemon_name}", "tern")]).await?;
    if !skipped(SMFIP_NOCONNECT) {
        let mut data = Vec::new();
        match context.client_ip {
            Some(ip) => {
                cstr(&mut data, &format!("[{ip}]"));
                data.push(if ip.is_ipv4() { b'4' } else { b'6' });
                data.extend_from_slice(&0u16.to_be_bytes());
                cstr(&mut data, &ip_text(ip));
            }
            None => {
                cstr(&mut data, "localhost");
                data.push(b'U');
            }
        }
        if let Step::Done(v) = step(conn, b'C', &data, skipped(SMFIP_NR_CONN)).await? {
            return Ok(done(v, Vec::new()));
        }
    }
    if !skipped(SMFIP_NOHELO) {
        let mut data = Vec::new();
        cstr(&mut data, &envelope.helo);
        if let Step::Done(v) = step(conn, b'H', &data, skipped(SMFIP_NR_HELO)).await? {
            return Ok(done(v, Vec::new()));
        }
    }
    let auth = envelope.auth_user.as_deref().unwrap_or("");
    let mut mail_macros = vec![("{mail_addr}", envelope.reverse_path.as_str())];
    if !auth.is_empty() {
        mail_macros.push(("{auth_authen}", auth));
    }
    macros(conn, b'M', &mail_macros).await?;
    if !skipped(SMFIP_NOMAIL) {
        let mut data = Vec::new();
        cstr(&mut data, &format!("<{}>", envelope.reverse_path));
        if let Step::Done(v) = step(conn, b'M', &data, skipped(SMFIP_NR_MAIL)).await? {
            return Ok(done(v, Vec::new()));
        }
    }
    if !skipped(SMFIP_NORCPT) {
        for recipient in &envelope.recipients {
            macros(conn, b'R', &[("{rcpt_addr}", recipient.address.as_str())]).await?;
            let mut data = Vec::new();
            cstr(&mut data, &format!("<{}>", recipient.address));
            if let Step::Done(v) = step(conn, b'R', &data, skipped(SMFIP_NR_RCPT)).await? {
                return Ok(done(v, Vec::new()));
            }
        }
    }
    if version >= 4 && !skipped(SMFIP_NODATA) {
        if let Step::Done(v) = step(conn, b'T', &[], skipped(SMFIP_NR_DATA)).await? {
            return Ok(done(v, Vec::new()));
        }
    }
    let parsed = Parsed::new(message);
    if !skipped(SMFIP_NOHDRS) {
        for field in &parsed.fields {
            let mut data = Vec::new();
            cbytes(&mut data, &field.name);
            // Sendmail's form: one leading space dropped, LF line ends.
            let value = field.value.strip_prefix(b" ").unwrap_or(&field.value);
            let value: Vec<u8> = value.iter().copied().filter(|&b| b != b'\r').collect();
            cbytes(&mut data, &value);
            if let Step::Done(v) = step(conn, b'L', &data, skipped(SMFIP_NR_HDR)).await? {
                return Ok(done(v, Vec::new()));
            }
        }
    }
    if !skipped(SMFIP_NOEOH) {
        if let Step::Done(v) = step(conn, b'N', &[], skipped(SMFIP_NR_EOH)).await? {
            return Ok(done(v, Vec::new()));
        }
    }
    if !skipped(SMFIP_NOBODY) {
        for chunk in parsed.body.chunks(CHUNK) {
            match step(conn, b'B', chunk, skipped(SMFIP_NR_BODY)).await? {
                Step::Continue => {}
                Step::Skip if skipped(SMFIP_SKIP) || version >= 6 => break,
                Step::Skip => return Err(protocol("skip without negotiation")),
                Step::Done(v) => return Ok(done(v, Vec::new())),
            }
        }
    }
    write_packet(conn, b'E', &[]).await?;
    end_of_message(conn, actions).await
}

/// Reads modifications and the final answer after SMFIC_BODYEOB.
async fn end_of_message(conn: &mut Box<dyn Io>, actions: u32) -> Result<Answer, FilterError> {
    let mut edits = Vec::new();
    let mut new_body: Option<Vec<u8>> = None;
    for _ in 0..MAX_MODIFICATIONS {
        let packet = read_packet(conn).await?;
        let allowed = |flag: u32| -> Result<(), FilterError> {
            if actions & flag == 0 {
                return Err(protocol(&format!(
                    "milter sent {:?} it did not negotiate",
                    char::from(packet.command)
                )));
            }
            Ok(())
        };
        match packet.command {
            b'h' => {
                allowed(SMFIF_ADDHDRS)?;
                let [name, value] = strings::<2>(&packet.data)?;
                edits.push(Edit::Append { name, value });
            }
            b'i' => {
                allowed(SMFIF_ADDHDRS)?;
                let index = index(&packet.data)?;
                let [name, value] = strings::<2>(&packet.data[4..])?;
                edits.push(Edit::Insert {
                    index: index as usize,
                    name,
                    value,
                });
            }
            b'm' => {
                allowed(SMFIF_CHGHDRS)?;
                let index = index(&packet.data)?;
                let [name, value] = strings::<2>(&packet.data[4..])?;
                edits.push(Edit::Change {
                    name,
                    index: index.max(1) as usize,
                    value: (!value.is_empty()).then_some(value),
                });
            }
            b'b' => {
                allowed(SMFIF_CHGBODY)?;
                // Several packets make one new body.
                let body = new_body.get_or_insert_with(Vec::new);
                if body.len() + packet.data.len() > MAX_NEW_BODY {
                    return Err(protocol("replacement body over 64 MiB"));
                }
                body.extend_from_slice(&packet.data);
            }
            b'q' => {
                allowed(SMFIF_QUARANTINE)?;
                let [reason] = strings::<1>(&packet.data)?;
                edits.push(Edit::Append {
                    name: "X-Tern-Quarantine".into(),
                    value: format!("milter {reason}"),
                });
            }
            b'p' => {}
            command => {
                if let Some(verdict) = verdict(command, &packet.data)? {
                    if let Some(body) = new_body {
                        edits.push(Edit::ReplaceBody(body));
                    }
                    return Ok(done(verdict, edits));
                }
                return Err(protocol(&format!(
                    "unexpected {:?} at end of message",
                    char::from(command)
                )));
            }
        }
    }
    Err(protocol("too many modifications"))
}

fn done(verdict: Verdict, edits: Vec<Edit>) -> Answer {
    Answer { verdict, edits }
}

/// Sends one step's packet and, unless the milter said it would not answer,
/// reads its answer (skipping progress packets).
async fn step(conn: &mut Box<dyn Io>, command: u8, data: &[u8], no_reply: bool) -> Result<Step, FilterError> {
    write_packet(conn, command, data).await?;
    if no_reply {
        return Ok(Step::Continue);
    }
    loop {
        let packet = read_packet(conn).await?;
        match packet.command {
            b'c' => return Ok(Step::Continue),
            b's' => return Ok(Step::Skip),
            b'p' => continue,
            other => match verdict(other, &packet.data)? {
                Some(v) => return Ok(Step::Done(v)),
                None => {
                    return Err(protocol(&format!(
                        "unexpected {:?} after {:?}",
                        char::from(other),
                        char::from(command)
                    )))
                }
            },
        }
    }
}

/// A final answer: accept, reject, tempfail, discard, reply code.
fn verdict(command: u8, data: &[u8]) -> Result<Option<Verdict>, FilterError> {
    Ok(Some(match command {
        b'a' => Verdict::Accept,
        b'r' => Verdict::Refuse(Reply::new(550, "5.7.1", "Command rejected")),
        b't' => Verdict::Refuse(Reply::new(451, "4.7.1", "Try again later")),
        b'd' => Verdict::Discard,
        b'y' => {
            let [text] = strings::<1>(data)?;
            Verdict::Refuse(reply_code(&text)?)
        }
        _ => return Ok(None),
    }))
}

/// SMFIR_REPLYCODE text such as `554 5.7.1 Gtube pattern` (possibly
/// multi-line with `554-`); only 4xx and 5xx are taken.
fn reply_code(text: &str) -> Result<Reply, FilterError> {
    let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
    let code: u16 = first
        .get(..3)
        .and_then(|c| c.parse().ok())
        .filter(|c| (400..600).contains(c))
        .ok_or_else(|| protocol(&format!("bad reply code {first:?}")))?;
    let rest = first[3..].trim_start_matches(['-', ' ']);
    let (enhanced, text) = match rest.split_once(' ') {
        Some((e, t)) if is_enhanced(e, code) => (e.to_owned(), t),
        _ if is_enhanced(rest, code) => (rest.to_owned(), ""),
        _ => (default_enhanced(code).to_owned(), rest),
    };
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    let text = if text.is_empty() {
        "Message refused by filter".into()
    } else {
        text
    };
    Ok(Reply::synthetic(code, &enhanced, text))
}

fn is_enhanced(s: &str, code: u16) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[0].parse::<u16>().ok() == Some(code / 100)
}

fn default_enhanced(code: u16) -> &'static str {
    if code >= 500 {
        "5.7.1"
    } else {
        "4.7.1"
    }
}

/// SMFIC_MACRO for the command `for`: name/value pairs.
async fn macros(conn: &mut Box<dyn Io>, r#for: u8, pairs: &[(&str, &str)]) -> Result<(), FilterError> {
    let mut data = vec![r#for];
    for (name, value) in pairs {
        cstr(&mut data, name);
        cstr(&mut data, value);
    }
    write_packet(conn, b'D', &data).await
}

fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    cbytes(out, s.as_bytes());
}

fn cbytes(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(s.iter().copied().filter(|&b| b != 0));
    out.push(0);
}

/// The first N NUL-terminated strings of `data`.
fn strings<const N: usize>(data: &[u8]) -> Result<[String; N], FilterError> {
    let mut parts = data.split(|&b| b == 0);
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    for slot in &mut out {
        let part = parts.next().ok_or_else(|| protocol("short packet"))?;
        *slot = String::from_utf8_lossy(part).into_owned();
    }
    Ok(out)
}

fn index(data: &[u8]) -> Result<u32, FilterError> {
    data.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| protocol("short packet"))
}

async fn write_packet(conn: &mut Box<dyn Io>, command: u8, data: &[u8]) -> Result<(), FilterError> {
    let len = u32::try_from(data.len() + 1).map_err(|_| protocol("packet too large"))?;
    let mut packet = Vec::with_capacity(data.len() + 5);
    packet.extend_from_slice(&len.to_be_bytes());
    packet.push(command);
    packet.extend_from_slice(data);
    conn.write_all(&packet).await?;
    conn.flush().await?;
    Ok(())
}

async fn read_packet(conn: &mut Box<dyn Io>) -> Result<Packet, FilterError> {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_PACKET {
        return Err(protocol(&format!("packet of {len} octets")));
    }
    let mut data = vec![0u8; len];
    conn.read_exact(&mut data).await?;
    let command = data.remove(0);
    Ok(Packet { command, data })
}

fn protocol(what: &str) -> FilterError {
    FilterError::Protocol(format!("milter: {what}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes() {
        let r = reply_code("554 5.7.1 Gtube pattern").unwrap();
        assert_eq!(
            (r.code, r.enhanced.as_deref(), r.text()),
            (554, Some("5.7.1"), "Gtube pattern".into())
        );
        let r = reply_code("451 try later").unwrap();
        assert_eq!((r.code, r.enhanced.as_deref()), (451, Some("4.7.1")));
        assert!(reply_code("250 ok").is_err());
        assert!(reply_code("").is_err());
    }

    #[test]
    fn strings_split_on_nul() {
        let [a, b] = strings::<2>(b"X-Spam\0Yes\0").unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("X-Spam", "Yes"));
        assert!(strings::<2>(b"").is_err());
    }
}
