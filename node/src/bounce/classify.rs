//! The bounce classifier: which [`Class`] a failure or deferral reply
//! reports, from its reply code, its enhanced status code (RFC 3463) and
//! its text. The operator's `[[bounce_class]]` rules are checked first,
//! then the shipped table ([`SHIPPED`]: specific texts of providers and of
//! Tern's own replies, then enhanced codes); the first rule that matches
//! decides, and a reply no rule matches is [`Class::Other`]. Pure: no I/O.

use std::sync::{Arc, LazyLock};

use tern_config::ClassRule;
pub use tern_model::bounce::Class;

/// One shipped rule: `(code prefix, enhanced code or prefix ending in
/// '.', regex on the text, class)`; empty strings match anything.
type Shipped = (&'static str, &'static str, &'static str, Class);

/// The shipped table, in order. Texts that name a cause precisely come
/// before enhanced codes, which senders use loosely (a 5.7.1 may be spam,
/// a block list or a policy; a 5.1.10 is a Null MX from us but "recipient
/// not found" from Microsoft).
pub const SHIPPED: &[Shipped] = &[
    // DNS: our own resolver replies (delivery/resolve.rs) and common texts.
    ("", "", r"null mx", Class::DnsFailure),
    (
        "",
        "",
        r"nxdomain|domain \S+ does not exist|no such domain|host (or domain name )?not found|no address for|directory server failure|resolver misconfigured|name service error|dns (lookup )?(failure|error)",
        Class::DnsFailure,
    ),
    // TLS required (5.7.10 encryption needed, 5.7.11 encryption required).
    ("", "5.7.10", "", Class::TlsRequired),
    ("", "5.7.11", "", Class::TlsRequired),
    ("", "4.7.10", "", Class::TlsRequired),
    ("", "4.7.11", "", Class::TlsRequired),
    (
        "",
        "",
        r"tls (is )?required|must issue a starttls|starttls (is )?required|encryption (is )?required|requires? (a )?(secure|encrypted) connection",
        Class::TlsRequired,
    ),
    // Reputation: our IP or domain is listed, blocked or throttled for what it sent before.
    (
        "",
        "",
        r"spamhaus|spamcop|barracuda|sorbs|\bdnsbl\b|\brbl\b|block ?list|black ?list|\blisted\b|reputation|\bTSS0\d\b|banned sending ip|\(S3\d{3}\)|from your ip|originating from your ip|(ip|ip address|sending host|client host|your host|network|domain) \[?[^\s\]]*\]? ?(is |has been )?(temporarily )?(blocked|rejected|banned|refused)|messages from \[?[0-9a-f.:]+\]? (weren't sent|temporarily deferred|will be permanently deferred)|user complaints|unexpected volume",
        Class::Reputation,
    ),
    // Message too large before mailbox full ("mailbox size" is a quota).
    (
        "",
        "",
        r"quota|mailbox (is |was )?full|full mailbox|mailbox size limit|exceeded storage allocation|storage space|out of storage|insufficient storage|over ?quota",
        Class::MailboxFull,
    ),
    ("", "5.3.4", "", Class::MessageTooLarge),
    ("", "5.2.3", "", Class::MessageTooLarge),
    (
        "",
        "",
        r"message (size )?(exceeds|is too (big|large))|too (big|large)|size (limit )?exceed|exceeds (the )?(fixed )?maximum (message )?size",
        Class::MessageTooLarge,
    ),
    // Spam and content.
    (
        "",
        "",
        r"spam|unsolicited|\bjunk\b|bulk mail|content (was )?(rejected|refused)|message content|virus|malware|phishing|suspicious (content|link|url)",
        Class::SpamBlock,
    ),
    // Inactive and disabled mailboxes.
    ("5", "5.2.1", "", Class::Inactive),
    (
        "",
        "",
        r"(account|mailbox|user|address|recipient)[^.;]{0,40}\b(is |has been )?(disabled|inactive|deactivated|expired|locked|closed|no longer (active|in use|available))|inactive (user|account|mailbox)",
        Class::Inactive,
    ),
    // Invalid recipients.
    ("", "5.1.1", "", Class::InvalidRecipient),
    ("", "5.1.10", "", Class::InvalidRecipient),
    ("", "5.1.3", "", Class::InvalidRecipient),
    ("", "5.1.6", "", Class::InvalidRecipient),
    (
        "",
        "",
        r"user unknown|unknown (user|recipient|mailbox)|no such (user|mailbox|recipient|address)|(mailbox|account|address|user|recipient)[^.;]{0,40}(does not exist|doesn't exist|not found|unknown|invalid)|invalid (recipient|mailbox|address|user)|not a valid (mailbox|recipient|user)|undeliverable address|doesn't have an? \S+ account|no such account|recipientnotfound|no mailbox here|mailbox unavailable|unrouteable address",
        Class::InvalidRecipient,
    ),
    // Policy: the receiver's rules about senders, relaying, authentication.
    (
        "",
        "",
        r"policy|not authori[sz]ed|relay(ing)? (access )?(denied|not permitted)|not permitted|dmarc|\bspf\b|\bdkim\b|authentication (required|failed)|unauthenticated|sender (address )?rejected|access denied|suspended by the administrator",
        Class::Policy,
    ),
    // Routing: no route or connection (4.4.x and 5.4.x, our own connect failures).
    ("", "4.4.3", "", Class::DnsFailure),
    ("", "5.1.2", "", Class::DnsFailure),
    ("", "4.4.", "", Class::Routing),
    ("", "5.4.", "", Class::Routing),
    (
        "",
        "",
        r"connection (refused|timed out|reset)|no route to host|network is unreachable|mail loop|too many hops",
        Class::Routing,
    ),
    // What is left of the enhanced codes.
    ("", "4.2.2", "", Class::MailboxFull),
    ("", "5.2.2", "", Class::MailboxFull),
    ("", "5.1.", "", Class::InvalidRecipient),
    ("", "5.7.", "", Class::Policy),
    ("", "4.7.", "", Class::Policy),
];

static SHIPPED_RULES: LazyLock<Vec<ClassRule>> = LazyLock::new(|| {
    SHIPPED
        .iter()
        .filter_map(|&(code, enhanced, pattern, class)| {
            let pattern = match pattern {
                "" => None,
                // A shipped pattern that does not compile is a bug the
                // unit tests catch; it is left out rather than panicking.
                p => Some(regex::RegexBuilder::new(p).case_insensitive(true).build().ok()?),
            };
            Some(ClassRule {
                code: (!code.is_empty()).then(|| code.to_owned()),
                enhanced: (!enhanced.is_empty()).then(|| enhanced.to_owned()),
                pattern,
                class,
            })
        })
        .collect()
});

/// Classifies replies with the operator's rules, then the shipped table.
/// Clones share the rules: [`Classifier::set_rules`] (a config reload)
/// changes them for delivery and the event outbox at once.
#[derive(Clone, Debug, Default)]
pub struct Classifier {
    rules: Arc<arc_swap::ArcSwap<Vec<ClassRule>>>,
}

impl Classifier {
    /// A classifier that checks `rules` (`[[bounce_class]]`) first.
    pub fn new(rules: Vec<ClassRule>) -> Classifier {
        Classifier {
            rules: Arc::new(arc_swap::ArcSwap::from_pointee(rules)),
        }
    }

    /// Replaces the operator's rules, for this classifier and its clones.
    pub fn set_rules(&self, rules: Vec<ClassRule>) {
        self.rules.store(Arc::new(rules));
    }

    /// The class of a failure or deferral reply such as
    /// `550 5.1.1 <a@b>: Recipient address rejected: User unknown`.
    pub fn classify(&self, reply: &str) -> Class {
        let (code, enhanced) = codes(reply);
        self.rules
            .load()
            .iter()
            .chain(SHIPPED_RULES.iter())
            .find(|r| r.matches(code, enhanced, reply))
            .map_or(Class::Other, |r| r.class)
    }
}

/// The reply code and the enhanced status code (`""` when absent) of a
/// reply; multi-line replies as `550-5.1.1 ...` or `550 5.1.1 ...`.
fn codes(reply: &str) -> (&str, &str) {
    let reply = reply.trim_start();
    let code_end = reply.find(|c: char| !c.is_ascii_digit()).unwrap_or(reply.len());
    let code = if code_end == 3 { &reply[..3] } else { "" };
    let rest = reply[code_end..].trim_start_matches(['-', ' ']);
    let enhanced = rest.split_whitespace().next().unwrap_or("");
    let enhanced = enhanced.trim_end_matches([',', ';', ':']);
    let valid = enhanced.split('.').count() == 3
        && enhanced
            .split('.')
            .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()));
    (code, if valid { enhanced } else { "" })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn class(reply: &str) -> Class {
        Classifier::default().classify(reply)
    }

    #[test]
    fn every_shipped_pattern_compiles() {
        assert_eq!(SHIPPED_RULES.len(), SHIPPED.len());
    }

    #[test]
    fn codes_are_read_from_single_and_multi_line_replies() {
        assert_eq!(codes("550 5.1.1 no"), ("550", "5.1.1"));
        assert_eq!(codes("550-5.1.1 The email"), ("550", "5.1.1"));
        assert_eq!(codes("421 Service not available"), ("421", ""));
        assert_eq!(codes(""), ("", ""));
        assert_eq!(codes("5.1.1"), ("", ""));
    }

    /// Real replies of providers and of common MTAs (and Tern's own).
    #[test]
    fn real_replies_get_their_class() {
        let cases: &[(&str, Class)] = &[
            // Gmail
            ("550-5.1.1 The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. Learn more at https://support.google.com/mail/?p=NoSuchUser", Class::InvalidRecipient),
            ("552-5.2.2 The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaPerm", Class::MailboxFull),
            ("550-5.2.1 The email account that you tried to reach is disabled. Learn more at https://support.google.com/mail/?p=DisabledUser", Class::Inactive),
            ("550-5.7.1 Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked.", Class::SpamBlock),
            ("421-4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.", Class::Reputation),
            ("550-5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM.", Class::Policy),
            ("552-5.3.4 Your message exceeded Google's message size limits.", Class::MessageTooLarge),
            ("452-4.2.2 The email account that you tried to reach is over quota.", Class::MailboxFull),
            // Microsoft
            ("550 5.5.0 Requested action not taken: mailbox unavailable (S2017062302). [BN8NAM11FT066.eop-nam11.prod.protection.outlook.com]", Class::InvalidRecipient),
            ("550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", Class::InvalidRecipient),
            ("550 5.7.606 Access denied, banned sending IP [192.0.2.1]. To request removal from this list please visit https://sender.office.com/", Class::Reputation),
            ("550 5.7.1 Unfortunately, messages from [192.0.2.1] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", Class::Reputation),
            ("451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719)", Class::Policy),
            // Yahoo / AOL
            ("421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", Class::Reputation),
            ("553 5.7.2 [TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed. See https://postmaster.yahooinc.com/error-codes", Class::Reputation),
            ("554 5.7.9 Message not accepted for policy reasons.  See https://postmaster.yahooinc.com/error-codes", Class::Policy),
            ("554 delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1234.mail.gq1.yahoo.com", Class::InvalidRecipient),
            ("552 1 Requested mail action aborted, mailbox not found", Class::InvalidRecipient),
            // Postfix, Exim, others
            ("550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in virtual mailbox table", Class::InvalidRecipient),
            ("550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown in local recipient table", Class::InvalidRecipient),
            ("554 5.7.1 <client.example.net[192.0.2.1]>: Client host rejected: Access denied", Class::Reputation),
            ("554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", Class::Reputation),
            ("554 5.7.1 <a@example.org>: Relay access denied", Class::Policy),
            ("552 5.3.4 Message size exceeds fixed limit", Class::MessageTooLarge),
            ("552 5.2.2 <a@example.org>: mailbox full", Class::MailboxFull),
            ("452 4.2.2 Mailbox full", Class::MailboxFull),
            ("550 Requested action not taken: mailbox unavailable", Class::InvalidRecipient),
            ("550 5.7.1 Message rejected due to content restrictions: virus found", Class::SpamBlock),
            ("550 5.7.1 Email rejected per DMARC policy for example.com", Class::Policy),
            ("530 5.7.0 Must issue a STARTTLS command first", Class::TlsRequired),
            ("550 5.7.10 Encryption needed", Class::TlsRequired),
            ("550 5.2.1 Mailbox disabled, not accepting messages", Class::Inactive),
            ("550 5.1.1 sorry, no mailbox here by that name", Class::InvalidRecipient),
            ("554 5.4.6 Hop count exceeded - possible mail loop", Class::Routing),
            // Tern's own replies (delivery/resolve.rs, delivery/mod.rs, site.rs)
            ("550 5.1.2 nx.test: Domain nx.test does not exist", Class::DnsFailure),
            ("550 5.1.10 nomail.test: Recipient address has null MX (nomail.test)", Class::DnsFailure),
            ("550 5.4.4 a.test: Unable to route: no address for a.test", Class::DnsFailure),
            ("451 4.4.3 a.test: Directory server failure: timed out", Class::DnsFailure),
            ("451 4.4.1 mx.a.test:25: connection refused", Class::Routing),
            ("451 4.4.4 route for a.test: no address", Class::Routing),
            ("451 4.4.1 127.0.0.1:25: TLS required but 127.0.0.1:25 does not offer STARTTLS", Class::TlsRequired),
            ("451 4.7.0 deliveries to a.test suspended by the administrator: maintenance", Class::Policy),
            ("451 4.3.0 delivery interrupted", Class::Other),
            ("421 Service not available", Class::Other),
            ("", Class::Other),
        ];
        let wrong: Vec<String> = cases
            .iter()
            .filter(|(reply, want)| class(reply) != *want)
            .map(|(reply, want)| format!("{reply:?}: {} (want {want})", class(reply)))
            .collect();
        assert!(wrong.is_empty(), "{} misclassified:\n{}", wrong.len(), wrong.join("\n"));
    }

    #[test]
    fn operator_rules_come_first() {
        let rules = tern_config::Config::from_toml(
            "[[bounce_class]]\nenhanced = \"5.7.1\"\nmatch = \"unsolicited\"\nclass = \"reputation\"\n",
        )
        .unwrap()
        .bounce_classes;
        let c = Classifier::new(rules);
        let gmail = "550-5.7.1 Our system has detected that this message is likely unsolicited mail.";
        assert_eq!(c.classify(gmail), Class::Reputation);
        assert_eq!(class(gmail), Class::SpamBlock);
        assert_eq!(c.classify("550 5.1.1 unknown"), Class::InvalidRecipient);

        // A reload sets the rules of every clone (the event outbox holds one).
        let outbox = c.clone();
        c.set_rules(Vec::new());
        assert_eq!(outbox.classify(gmail), Class::SpamBlock);
    }
}
