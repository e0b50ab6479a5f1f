//! Tern's own SPF evaluator, `check_host()` of RFC 7208, over mail-auth's
//! hickory resolver. mail-auth 0.13's evaluator parses leniently and turns
//! unusable target names into `temperror`, so a broken record under DMARC
//! `p=reject` got a 451 instead of a 550; this one follows the RFC:
//!
//! - the whole record is parsed before anything is evaluated; any syntax
//!   error (bad CIDR, toplabel, macro, duplicate modifier) is `permerror`;
//! - two SPF records are `permerror`;
//! - at most 10 DNS-querying terms (include, a, mx, ptr, exists, redirect)
//!   and 2 void lookups per evaluation, 10 MX and 10 PTR names per term;
//! - a target name that cannot form a DNS query matches nothing;
//! - IPv4 clients (also IPv4-mapped IPv6) only match ip4/A, IPv6 only ip6/AAAA;
//! - `exp=` gives the explanation of a `fail` (errors in it are ignored).
//!
//! Results are mail-auth's `SpfOutput`, so DMARC and the header writers
//! take them unchanged.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;

use mail_auth::hickory_resolver::proto::rr::{Name, RData, RecordType};
use mail_auth::hickory_resolver::TokioResolver;
use mail_auth::{SpfOutput, SpfResult};

/// DNS-querying terms per evaluation (RFC 7208 4.6.4).
const MAX_LOOKUPS: u32 = 10;
/// Lookups answering NXDOMAIN or no records (RFC 7208 4.6.4).
const MAX_VOID_LOOKUPS: u32 = 2;
/// Exchanges per `mx`, names per `ptr` (RFC 7208 4.6.4).
const MAX_NAMES: usize = 10;
/// A record longer than this is not a plausible SPF record (bounds parsing).
const MAX_RECORD_LEN: usize = 4096;

/// Who is being checked.
#[derive(Clone, Debug)]
pub struct Params<'a> {
    pub ip: IpAddr,
    /// The HELO/EHLO name.
    pub helo: &'a str,
    /// `local@domain`: the MAIL FROM address, or `postmaster@HELO`.
    pub sender: &'a str,
    /// Our host name (`%{r}`).
    pub receiver: &'a str,
}

/// `check_host(ip, domain, sender)` (RFC 7208 4).
pub async fn check_host(resolver: &TokioResolver, params: &Params<'_>, domain: &str) -> SpfOutput {
    let (local, sender_domain) = match params.sender.rsplit_once('@') {
        Some((l, d)) if !l.is_empty() => (l.to_owned(), d.to_owned()),
        Some((_, d)) => ("postmaster".to_owned(), d.to_owned()),
        None => ("postmaster".to_owned(), params.sender.to_owned()),
    };
    let mut eval = Eval {
        dns: resolver,
        ip: params.ip.to_canonical(),
        local,
        sender_domain,
        helo: params.helo.to_owned(),
        receiver: params.receiver.to_owned(),
        lookups: 0,
        voids: 0,
        ptr_macro: None,
    };
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let (result, explanation) = eval.check(domain.clone(), true).await;
    let mut out = SpfOutput::new(domain).with_result(result);
    if let Some(e) = explanation {
        out = out.with_explanation(e);
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Mechanism {
    All,
    Include(String),
    A(Option<String>, u8, u8),
    Mx(Option<String>, u8, u8),
    Ptr(Option<String>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(String),
}

#[derive(Debug, Default)]
struct Record {
    directives: Vec<(SpfResult, Mechanism)>,
    redirect: Option<String>,
    exp: Option<String>,
}

/// An evaluation that ends early: `temperror` or `permerror`.
type Halt = SpfResult;

struct Eval<'a> {
    dns: &'a TokioResolver,
    ip: IpAddr,
    local: String,
    sender_domain: String,
    helo: String,
    receiver: String,
    lookups: u32,
    voids: u32,
    /// `%{p}`, once looked up: (domain it was chosen for, name).
    ptr_macro: Option<(String, String)>,
}

type Boxed<'b, T> = Pin<Box<dyn Future<Output = T> + Send + 'b>>;

impl Eval<'_> {
    /// check_host() of `domain`; the explanation is wanted at the top level
    /// and through `redirect`, not through `include`.
    fn check(&mut self, domain: String, want_exp: bool) -> Boxed<'_, (SpfResult, Option<String>)> {
        Box::pin(async move {
            if !queryable(&domain) {
                return (SpfResult::None, None);
            }
            let text = match self.spf_record(&domain).await {
                Ok(Some(text)) => text,
                Ok(None) => return (SpfResult::None, None),
                Err(halt) => return (halt, None),
            };
            let record = match parse(&text) {
                Ok(r) => r,
                Err(()) => return (SpfResult::PermError, None),
            };
            match self.evaluate(&domain, &record, want_exp).await {
                Ok(r) => r,
                Err(halt) => (halt, None),
            }
        })
    }

    async fn evaluate(
        &mut self,
        domain: &str,
        record: &Record,
        want_exp: bool,
    ) -> Result<(SpfResult, Option<String>), Halt> {
        for (qualifier, mechanism) in &record.directives {
            if self.matches(domain, mechanism).await? {
                let explanation = match (*qualifier, &record.exp) {
                    (SpfResult::Fail, Some(exp)) if want_exp => self.explanation(domain, exp).await,
                    _ => None,
                };
                return Ok((*qualifier, explanation));
            }
        }
        if let Some(target) = &record.redirect {
            self.count_lookup()?;
            let target = self.target(domain, target).await?;
            return match self.check(target, want_exp).await {
                (SpfResult::None, _) => Err(SpfResult::PermError),
                r => Ok(r),
            };
        }
        Ok((SpfResult::Neutral, None))
    }

    async fn matches(&mut self, domain: &str, mechanism: &Mechanism) -> Result<bool, Halt> {
        match mechanism {
            Mechanism::All => Ok(true),
            Mechanism::Ip4(net, len) => Ok(match self.ip {
                IpAddr::V4(ip) => in_v4(ip, *net, *len),
                IpAddr::V6(_) => false,
            }),
            Mechanism::Ip6(net, len) => Ok(match self.ip {
                IpAddr::V6(ip) => in_v6(ip, *net, *len),
                IpAddr::V4(_) => false,
            }),
            Mechanism::Include(spec) => {
                self.count_lookup()?;
                let target = self.target(domain, spec).await?;
                match self.check(target, false).await.0 {
                    SpfResult::Pass => Ok(true),
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Ok(false),
                    SpfResult::TempError => Err(SpfResult::TempError),
                    SpfResult::PermError | SpfResult::None => Err(SpfResult::PermError),
                }
            }
            Mechanism::A(spec, c4, c6) => {
                self.count_lookup()?;
                let target = self.optional_target(domain, spec.as_deref()).await?;
                let addrs = self.addresses(&target, true).await?;
                Ok(addrs.iter().any(|a| self.in_cidr(*a, *c4, *c6)))
            }
            Mechanism::Mx(spec, c4, c6) => {
                self.count_lookup()?;
                let target = self.optional_target(domain, spec.as_deref()).await?;
                let answers = self.query(&target, RecordType::MX, true).await?;
                let exchanges: Vec<String> = answers
                    .iter()
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some(name_text(&mx.exchange)),
                        _ => None,
                    })
                    .collect();
                if exchanges.len() > MAX_NAMES {
                    return Err(SpfResult::PermError);
                }
                for exchange in exchanges.iter().filter(|e| !e.is_empty()) {
                    let addrs = self.addresses(exchange, false).await?;
                    if addrs.iter().any(|a| self.in_cidr(*a, *c4, *c6)) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Ptr(spec) => {
                self.count_lookup()?;
                let target = self.optional_target(domain, spec.as_deref()).await?;
                let names = self.validated_names(true).await?;
                Ok(names.iter().any(|n| is_within(n, &target)))
            }
            Mechanism::Exists(spec) => {
                self.count_lookup()?;
                let target = self.target(domain, spec).await?;
                // Always an A query, whatever the client's family (RFC 7208 5.7).
                let answers = self.query(&target, RecordType::A, true).await?;
                Ok(answers.iter().any(|r| matches!(r, RData::A(_))))
            }
        }
    }

    fn count_lookup(&mut self) -> Result<(), Halt> {
        self.lookups += 1;
        match self.lookups > MAX_LOOKUPS {
            true => Err(SpfResult::PermError),
            false => Ok(()),
        }
    }

    fn in_cidr(&self, addr: IpAddr, c4: u8, c6: u8) -> bool {
        match (self.ip, addr) {
            (IpAddr::V4(ip), IpAddr::V4(net)) => in_v4(ip, net, c4),
            (IpAddr::V6(ip), IpAddr::V6(net)) => in_v6(ip, net, c6),
            _ => false,
        }
    }

    /// The expanded target name of a mechanism (RFC 7208 4.8), lowercase,
    /// without a trailing dot, truncated from the left to 253 octets.
    async fn target(&mut self, domain: &str, spec: &str) -> Result<String, Halt> {
        self.prepare_ptr_macro(domain, spec).await?;
        let expanded = self.expand(domain, spec, false)?;
        Ok(truncate_name(expanded.trim_end_matches('.')).to_ascii_lowercase())
    }

    async fn optional_target(&mut self, domain: &str, spec: Option<&str>) -> Result<String, Halt> {
        match spec {
            Some(spec) => self.target(domain, spec).await,
            None => Ok(domain.to_owned()),
        }
    }

    /// The one SPF record of `domain`: `None` when it has none (or does
    /// not exist), permerror for two.
    async fn spf_record(&mut self, domain: &str) -> Result<Option<String>, Halt> {
        let answers = self.query(domain, RecordType::TXT, false).await?;
        let mut found = None;
        for rdata in answers {
            let RData::TXT(txt) = rdata else { continue };
            let bytes: Vec<u8> = txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect();
            let text = String::from_utf8_lossy(&bytes);
            let lower = text.get(..6).map(str::to_ascii_lowercase);
            let is_spf = lower.as_deref() == Some("v=spf1") && matches!(text.as_bytes().get(6), None | Some(b' '));
            if is_spf {
                if found.is_some() {
                    return Err(SpfResult::PermError);
                }
                found = Some(text.into_owned());
            }
        }
        Ok(found)
    }

    /// Addresses of `name` in the client's family. `void_counts`: the
    /// mechanism's own query (not an MX exchange's).
    async fn addresses(&mut self, name: &str, void_counts: bool) -> Result<Vec<IpAddr>, Halt> {
        let rtype = match self.ip {
            IpAddr::V4(_) => RecordType::A,
            IpAddr::V6(_) => RecordType::AAAA,
        };
        let answers = self.query(name, rtype, void_counts).await?;
        Ok(answers
            .iter()
            .filter_map(|r| match r {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect())
    }

    /// The client's PTR names whose addresses include the client (at most
    /// 10 tried); DNS errors here only mean fewer names (RFC 7208 5.5).
    async fn validated_names(&mut self, void_counts: bool) -> Result<Vec<String>, Halt> {
        let reverse = reverse_name(self.ip);
        let names: Vec<String> = match self.query(&reverse, RecordType::PTR, void_counts).await {
            Ok(answers) => answers
                .iter()
                .filter_map(|r| match r {
                    RData::PTR(p) => Some(name_text(&p.0)),
                    _ => None,
                })
                .take(MAX_NAMES)
                .collect(),
            Err(SpfResult::PermError) => return Err(SpfResult::PermError),
            Err(_) => return Ok(Vec::new()),
        };
        let mut validated = Vec::new();
        for name in names {
            let addrs = self.addresses(&name, false).await.unwrap_or_default();
            if addrs.contains(&self.ip) {
                validated.push(name);
            }
        }
        Ok(validated)
    }

    /// A query's answers of type `rtype` (CNAMEs followed by the resolver);
    /// empty for NXDOMAIN, no data, or a name that cannot be queried.
    async fn query(&mut self, name: &str, rtype: RecordType, void_counts: bool) -> Result<Vec<RData>, Halt> {
        let answers = match queryable(name).then(|| fqdn(name)) {
            Some(Ok(fqdn)) => match self.dns.lookup(fqdn, rtype).await {
                Ok(lookup) => lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect(),
                Err(e) if e.is_no_records_found() => Vec::new(),
                Err(_) => return Err(SpfResult::TempError),
            },
            // Not a usable name: it does not exist (no query, not void).
            _ => return Ok(Vec::new()),
        };
        if answers.is_empty() && void_counts {
            self.voids += 1;
            if self.voids > MAX_VOID_LOOKUPS {
                return Err(SpfResult::PermError);
            }
        }
        Ok(answers)
    }

    /// Looks up `%{p}` when `spec` uses it (RFC 7208 7.3): a validated
    /// name equal to `domain`, else one within it, else any, else "unknown".
    async fn prepare_ptr_macro(&mut self, domain: &str, spec: &str) -> Result<(), Halt> {
        let uses_p = spec.contains("%{p") || spec.contains("%{P");
        if !uses_p || self.ptr_macro.as_ref().is_some_and(|(d, _)| d == domain) {
            return Ok(());
        }
        let names = self.validated_names(false).await?;
        let name = names
            .iter()
            .find(|n| n.eq_ignore_ascii_case(domain))
            .or_else(|| names.iter().find(|n| is_within(n, domain)))
            .or_else(|| names.first())
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned());
        self.ptr_macro = Some((domain.to_owned(), name));
        Ok(())
    }

    /// The `exp=` text for a fail; `None` when it cannot be had.
    async fn explanation(&mut self, domain: &str, spec: &str) -> Option<String> {
        let target = self.target(domain, spec).await.ok()?;
        let answers = self.query(&target, RecordType::TXT, false).await.ok()?;
        let mut texts = answers.into_iter().filter_map(|r| match r {
            RData::TXT(txt) => Some(txt.txt_data.iter().flat_map(|s| s.iter().copied()).collect::<Vec<u8>>()),
            _ => None,
        });
        let text = texts.next()?;
        if texts.next().is_some() {
            return None;
        }
        let text = String::from_utf8(text).ok()?;
        if !valid_macro_string(&text, true) {
            return None;
        }
        let expanded = self.expand(domain, &text, true).ok()?;
        expanded.is_ascii().then_some(expanded)
    }

    /// Macro expansion (RFC 7208 7); `exp`: in an explanation (c, r, t).
    fn expand(&self, domain: &str, spec: &str, exp: bool) -> Result<String, Halt> {
        let mut out = String::new();
        let mut chars = spec.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('%') => out.push('%'),
                Some('_') => out.push(' '),
                Some('-') => out.push_str("%20"),
                Some('{') => {
                    let body: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    out.push_str(&self.expand_one(domain, &body, exp)?);
                }
                _ => return Err(SpfResult::PermError),
            }
        }
        Ok(out)
    }

    /// One `%{...}` (without braces).
    fn expand_one(&self, domain: &str, body: &str, exp: bool) -> Result<String, Halt> {
        let mut chars = body.chars();
        let letter = chars.next().ok_or(SpfResult::PermError)?;
        let rest: String = chars.collect();
        let value = match letter.to_ascii_lowercase() {
            's' => format!("{}@{}", self.local, self.sender_domain),
            'l' => self.local.clone(),
            'o' => self.sender_domain.clone(),
            'd' => domain.to_owned(),
            'i' => dotted_ip(self.ip),
            'p' => match &self.ptr_macro {
                Some((d, name)) if d == domain => name.clone(),
                _ => "unknown".to_owned(),
            },
            'v' => match self.ip {
                IpAddr::V4(_) => "in-addr".to_owned(),
                IpAddr::V6(_) => "ip6".to_owned(),
            },
            'h' => self.helo.clone(),
            'c' if exp => self.ip.to_string(),
            'r' if exp => self.receiver.clone(),
            't' if exp => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .to_string(),
            _ => return Err(SpfResult::PermError),
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let rest = &rest[digits.len()..];
        let (reverse, delimiters) = match rest.strip_prefix(['r', 'R']) {
            Some(d) => (true, d),
            None => (false, rest),
        };
        if !delimiters.chars().all(|c| ".-+,/_=".contains(c)) {
            return Err(SpfResult::PermError);
        }
        let delimiters = if delimiters.is_empty() { "." } else { delimiters };
        let mut parts: Vec<&str> = value.split(|c| delimiters.contains(c)).collect();
        if reverse {
            parts.reverse();
        }
        if !digits.is_empty() {
            let keep: usize = digits.parse().map_err(|_| SpfResult::PermError)?;
            if keep == 0 {
                return Err(SpfResult::PermError);
            }
            if keep < parts.len() {
                parts.drain(..parts.len() - keep);
            }
        }
        let joined = parts.join(".");
        Ok(match letter.is_ascii_uppercase() {
            true => url_escape(&joined),
            false => joined,
        })
    }
}

/// Parses an SPF record (its text starts with `v=spf1`), syntax only.
fn parse(text: &str) -> Result<Record, ()> {
    if text.len() > MAX_RECORD_LEN {
        return Err(());
    }
    let mut record = Record::default();
    for term in text[6..].split(' ').filter(|t| !t.is_empty()) {
        if !term.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(());
        }
        let name_len = term
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
            .unwrap_or(term.len());
        let is_modifier =
            term[name_len..].starts_with('=') && term.as_bytes().first().is_some_and(u8::is_ascii_alphabetic);
        if is_modifier {
            let (name, value) = (term[..name_len].to_ascii_lowercase(), &term[name_len + 1..]);
            match name.as_str() {
                "redirect" | "exp" => {
                    if !valid_domain_spec(value) {
                        return Err(());
                    }
                    let slot = if name == "redirect" {
                        &mut record.redirect
                    } else {
                        &mut record.exp
                    };
                    if slot.replace(value.to_owned()).is_some() {
                        return Err(());
                    }
                }
                _ if valid_macro_string(value, false) => {}
                _ => return Err(()),
            }
            continue;
        }
        let (qualifier, rest) = match term.as_bytes()[0] {
            b'+' => (SpfResult::Pass, &term[1..]),
            b'-' => (SpfResult::Fail, &term[1..]),
            b'~' => (SpfResult::SoftFail, &term[1..]),
            b'?' => (SpfResult::Neutral, &term[1..]),
            _ => (SpfResult::Pass, term),
        };
        record.directives.push((qualifier, mechanism(rest)?));
    }
    Ok(record)
}

fn mechanism(term: &str) -> Result<Mechanism, ()> {
    let name_len = term.find([':', '/']).unwrap_or(term.len());
    let (name, rest) = (term[..name_len].to_ascii_lowercase(), &term[name_len..]);
    let spec = |rest: &str| -> Result<String, ()> {
        let spec = rest.strip_prefix(':').ok_or(())?;
        match valid_domain_spec(spec) {
            true => Ok(spec.to_owned()),
            false => Err(()),
        }
    };
    let optional_spec = |rest: &str| -> Result<Option<String>, ()> {
        match rest.is_empty() {
            true => Ok(None),
            false => spec(rest).map(Some),
        }
    };
    Ok(match name.as_str() {
        "all" if rest.is_empty() => Mechanism::All,
        "include" => Mechanism::Include(spec(rest)?),
        "exists" => Mechanism::Exists(spec(rest)?),
        "ptr" => Mechanism::Ptr(optional_spec(rest)?),
        "a" | "mx" => {
            let (rest, c4, c6) = dual_cidr(rest)?;
            let target = optional_spec(rest)?;
            match name == "a" {
                true => Mechanism::A(target, c4, c6),
                false => Mechanism::Mx(target, c4, c6),
            }
        }
        "ip4" => {
            let value = rest.strip_prefix(':').ok_or(())?;
            let (addr, len) = split_cidr(value, 32)?;
            Mechanism::Ip4(addr.parse().map_err(|_| ())?, len)
        }
        "ip6" => {
            let value = rest.strip_prefix(':').ok_or(())?;
            let (addr, len) = split_cidr(value, 128)?;
            Mechanism::Ip6(addr.parse().map_err(|_| ())?, len)
        }
        _ => return Err(()),
    })
}

/// `addr[/len]` with `len` <= `max`, no leading zero.
fn split_cidr(value: &str, max: u8) -> Result<(&str, u8), ()> {
    match value.split_once('/') {
        Some((addr, len)) => Ok((addr, cidr_len(len, max)?)),
        None => Ok((value, max)),
    }
}

fn cidr_len(digits: &str, max: u8) -> Result<u8, ()> {
    let ok = !digits.is_empty()
        && digits.len() <= 3
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits.len() > 1 && digits.starts_with('0'));
    match ok {
        true => digits.parse::<u8>().ok().filter(|n| *n <= max).ok_or(()),
        false => Err(()),
    }
}

/// Splits a trailing `[/ip4-len][//ip6-len]` off an a/mx argument.
fn dual_cidr(rest: &str) -> Result<(&str, u8, u8), ()> {
    let mut rest = rest;
    let mut c6 = 128;
    if let Some(i) = rest.rfind("//") {
        c6 = cidr_len(&rest[i + 2..], 128)?;
        rest = &rest[..i];
    }
    let mut c4 = 32;
    if let Some(i) = rest.rfind('/') {
        let digits = &rest[i + 1..];
        // A '/' inside the domain-spec is a literal (RFC 7208 7.1).
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            c4 = cidr_len(digits, 32)?;
            rest = &rest[..i];
        } else if digits.is_empty() {
            return Err(());
        }
    }
    Ok((rest, c4, c6))
}

/// `macro-string` (RFC 7208 7.1); `exp`: c, r, t allowed, and spaces.
fn valid_macro_string(s: &str, exp: bool) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match b.get(i + 1) {
                Some(b'%' | b'_' | b'-') => i += 2,
                Some(b'{') => {
                    let Some(end) = s[i + 2..].find('}') else {
                        return false;
                    };
                    let body = &s[i + 2..i + 2 + end];
                    if !valid_macro_body(body, exp) {
                        return false;
                    }
                    i += 3 + end;
                }
                _ => return false,
            },
            b' ' if exp => i += 1,
            0x21..=0x7e => i += 1,
            _ => return false,
        }
    }
    true
}

fn valid_macro_body(body: &str, exp: bool) -> bool {
    let mut chars = body.chars();
    let letters = if exp { "slodiphvcrt" } else { "slodiphv" };
    let Some(letter) = chars.next() else {
        return false;
    };
    if !letters.contains(letter.to_ascii_lowercase()) {
        return false;
    }
    let rest: String = chars.collect();
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix(['r', 'R']).unwrap_or(rest);
    rest.chars().all(|c| ".-+,/_=".contains(c))
}

/// `domain-spec`: a macro-string ending in a macro or in `.toplabel[.]`.
fn valid_domain_spec(spec: &str) -> bool {
    if spec.is_empty() || !valid_macro_string(spec, false) {
        return false;
    }
    let trimmed = spec.strip_suffix('.').unwrap_or(spec);
    if trimmed.ends_with('}') || spec.ends_with("%%") || spec.ends_with("%_") || spec.ends_with("%-") {
        return true;
    }
    let Some((_, top)) = trimmed.rsplit_once('.') else {
        return false;
    };
    let b = top.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter().any(|c| c.is_ascii_alphabetic() || *c == b'-')
}

/// A name a DNS query can be formed from: labels of 1 to 63 octets, at
/// most 253 in all, at least two labels.
fn queryable(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.len() <= 253 && name.contains('.') && name.split('.').all(|l| (1..=63).contains(&l.len()))
}

/// RFC 7208 4.8: drop labels from the left until at most 253 octets.
fn truncate_name(name: &str) -> &str {
    let mut name = name;
    while name.len() > 253 {
        match name.split_once('.') {
            Some((_, rest)) => name = rest,
            None => break,
        }
    }
    name
}

/// The query name: raw labels, since a domain-spec may hold any visible
/// character (`:`, `/`, `%`; RFC 7208 7.1) and the zone may have them.
fn fqdn(name: &str) -> Result<Name, ()> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut n = Name::from_labels(name.split('.').map(str::as_bytes)).map_err(|_| ())?;
    n.set_fqdn(true);
    Ok(n)
}

/// A name from an answer as its raw labels (no escaping of `:` and the like).
fn name_text(name: &Name) -> String {
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    labels.join(".")
}

fn is_within(name: &str, domain: &str) -> bool {
    let domain = domain.trim_end_matches('.');
    name.eq_ignore_ascii_case(domain)
        || (name.len() > domain.len()
            && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

fn in_v4(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// `%{i}`: dotted quad, or dot-separated nibbles for IPv6.
fn dotted_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            hex.chars().map(String::from).collect::<Vec<_>>().join(".")
        }
    }
}

fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(_) => {
            let nibbles: Vec<String> = dotted_ip(ip).split('.').rev().map(str::to_owned).collect();
            format!("{}.ip6.arpa", nibbles.join("."))
        }
    }
}

/// Uppercase macro letters: URL-escape all but unreserved characters.
fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn syntax() {
        assert!(parse("v=spf1 a:foo.example.com/24//64 -all").is_ok());
        assert!(parse("v=spf1 a/33").is_err());
        assert!(parse("v=spf1 a/032").is_err());
        assert!(parse("v=spf1 a:foo").is_err());
        assert!(parse("v=spf1 a:1.2.3.4").is_err());
        assert!(parse("v=spf1 a:foo:bar/baz.example.com").is_ok());
        assert!(parse("v=spf1 moo.cow-far_out=man:dog/cat").is_ok());
        assert!(parse("v=spf1 =foo").is_err());
        assert!(parse("v=spf1 redirect=a.example redirect=b.example").is_err());
        assert!(parse("v=spf1 ip4:1.2.3.4/33").is_err());
        assert!(parse("v=spf1 include:%{d}").is_ok());
        assert!(parse("v=spf1 exists:%{x}.example.com").is_err());
    }

    #[test]
    fn cidr_and_names() {
        assert!(in_v4("1.2.3.4".parse().unwrap(), "1.2.0.0".parse().unwrap(), 16));
        assert!(in_v4("1.2.3.4".parse().unwrap(), "9.9.9.9".parse().unwrap(), 0));
        assert!(!in_v6("::1".parse().unwrap(), "::2".parse().unwrap(), 128));
        assert!(is_within("mail.example.com", "example.com") && !is_within("badexample.com", "example.com"));
        assert_eq!(reverse_name("1.2.3.4".parse().unwrap()), "4.3.2.1.in-addr.arpa");
    }
}
