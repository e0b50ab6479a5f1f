//! Templates of the API (minijinja): compiled once per call, rendered once
//! per recipient. Undefined variables are errors (strict), only the html
//! part is HTML-escaped, and a hostile template is bounded in CPU (fuel),
//! recursion and output size.

use std::collections::BTreeSet;

use axum::http::StatusCode;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

use super::problem::Problem;
use tern_model::api::StoredTemplate;

/// Instructions one render may run: a loop over a few thousand items fits,
/// an endless one stops.
pub const FUEL: u64 = 500_000;
/// Instructions all renders of one call may run together: a 10,000-message
/// batch of ordinary templates needs a few million; this stops a template
/// just under `FUEL` from costing 10,000 times that.
pub const CALL_FUEL: u64 = 50_000_000;
/// Nesting of includes, macros and blocks.
const RECURSION_LIMIT: usize = 64;

/// Which of a message's templates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Subject,
    Text,
    Html,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Subject => "subject",
            Part::Text => "text",
            Part::Html => "html",
        }
    }
}

/// The subject, text and html templates of one call, compiled.
pub struct Compiled {
    env: Environment<'static>,
    has_text: bool,
    has_html: bool,
    /// Fuel the renders of this call have used so far.
    spent: std::cell::Cell<u64>,
    /// Blamed when the call's renders run out of `CALL_FUEL`.
    budget_field: String,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("has_text", &self.has_text)
            .field("has_html", &self.has_html)
            .finish()
    }
}

impl Compiled {
    /// Compiles the sources; a syntax error is a 400 whose field is
    /// `field(part)` (the JSON pointer of that source in the request).
    pub fn compile(
        subject: &str,
        text: Option<&str>,
        html: Option<&str>,
        field: impl Fn(Part) -> String,
    ) -> Result<Compiled, Problem> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| {
            if name == "html" {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        for (part, source) in [(Part::Subject, Some(subject)), (Part::Text, text), (Part::Html, html)] {
            if let Some(source) = source {
                env.add_template_owned(part.name(), source.to_owned()).map_err(|e| {
                    Problem::invalid(
                        &field(part),
                        format!("template `{}` does not compile: {}", part.name(), describe(&e)),
                    )
                })?;
            }
        }
        Ok(Compiled {
            env,
            has_text: text.is_some(),
            has_html: html.is_some(),
            spent: std::cell::Cell::new(0),
            budget_field: field(Part::Subject),
        })
    }

    pub fn has(&self, part: Part) -> bool {
        match part {
            Part::Subject => true,
            Part::Text => self.has_text,
            Part::Html => self.has_html,
        }
    }

    /// Renders `part` with `vars` (a map), writing at most `max_bytes`.
    /// `who` names the recipient and `field` is the JSON pointer of its
    /// variables, for the error.
    pub fn render(&self, part: Part, vars: &Value, max_bytes: u64, who: &str, field: &str) -> Result<String, Problem> {
        let template = self
            .env
            .get_template(part.name())
            .map_err(|e| Problem::invalid(field, describe(&e)))?;
        let mut out = Limited {
            buf: Vec::new(),
            max: max_bytes,
        };
        let result = template.render_captured_to(vars, &mut out);
        if let Ok(captured) = &result {
            let used = captured.state().fuel_levels().map_or(0, |(consumed, _)| consumed);
            self.spent.set(self.spent.get().saturating_add(used));
            if self.spent.get() > CALL_FUEL {
                return Err(Problem::invalid(
                    &self.budget_field,
                    format!(
                        "{who}: the templates of this call ran more than {CALL_FUEL} instructions in all; \
                         send fewer recipients per call or simpler templates"
                    ),
                ));
            }
        }
        if let Err(e) = result {
            if out.buf.len() as u64 >= max_bytes || e.kind() == ErrorKind::WriteFailure {
                return Err(too_large(part, who, max_bytes));
            }
            if e.kind() == ErrorKind::UndefinedError {
                let missing = missing_variables(&self.env, &template.undeclared_variables(false), vars);
                if !missing.is_empty() {
                    let names: Vec<String> = missing.iter().map(|n| format!("`{n}`")).collect();
                    return Err(Problem::invalid(
                        field,
                        format!(
                            "{who}: template `{}` uses undefined variable {} ({})",
                            part.name(),
                            names.join(", "),
                            describe(&e)
                        ),
                    ));
                }
            }
            return Err(Problem::invalid(
                field,
                format!("{who}: template `{}` failed: {}", part.name(), describe(&e)),
            ));
        }
        String::from_utf8(out.buf).map_err(|_| Problem::invalid(field, "template output is not UTF-8"))
    }
}

fn too_large(part: Part, who: &str, max: u64) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Payload too large",
        format!("{who}: template `{}` renders more than {max} bytes", part.name()),
    )
}

/// The error with its cause chain (minijinja puts the location in it).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Top-level names the template reads that neither the variables nor the
/// environment's globals (`range`, `namespace`, ...) define.
fn missing_variables(
    env: &Environment<'_>,
    undeclared: &std::collections::HashSet<String>,
    vars: &Value,
) -> BTreeSet<String> {
    let globals: BTreeSet<&str> = env.globals().map(|(n, _)| n).collect();
    undeclared
        .iter()
        .filter(|name| !globals.contains(name.as_str()))
        .filter(|name| vars.get_attr(name).map(|v| v.is_undefined()).unwrap_or(true))
        .cloned()
        .collect()
}

/// A writer that refuses to grow past `max` bytes (a template cannot
/// allocate its way past the message size limit).
struct Limited {
    buf: Vec<u8>,
    max: u64,
}

impl std::io::Write for Limited {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() as u64 + data.len() as u64 > self.max {
            return Err(std::io::Error::other("template output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks that a stored template compiles (`PUT /api/v1/templates/NAME`).
pub fn validate(template: &StoredTemplate) -> Result<(), Problem> {
    if template.subject.trim().is_empty() {
        return Err(Problem::invalid("/subject", "subject is empty"));
    }
    if template.text.is_none() && template.html.is_none() {
        return Err(Problem::invalid("/text", "a template needs `text`, `html` or both"));
    }
    Compiled::compile(
        &template.subject,
        template.text.as_deref(),
        template.html.as_deref(),
        |part| format!("/{}", part.name()),
    )
    .map(|_| ())
}

/// Template names: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), Problem> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Problem::invalid(
            "/name",
            format!("template name `{name}` must be 1 to 64 characters of A-Z, a-z, 0-9, `.`, `_`, `-`"),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn compile(subject: &str, text: Option<&str>, html: Option<&str>) -> Compiled {
        Compiled::compile(subject, text, html, |p| format!("/{}", p.name())).unwrap()
    }

    #[test]
    fn renders_and_escapes_only_html() {
        let c = compile("Hi {{ name }}", Some("Dear {{ name }}"), Some("<p>{{ name }}</p>"));
        let vars = Value::from_serialize(serde_json::json!({"name": "<script>x</script>"}));
        assert_eq!(
            c.render(Part::Subject, &vars, 1000, "r", "/v").unwrap(),
            "Hi <script>x</script>"
        );
        assert_eq!(
            c.render(Part::Text, &vars, 1000, "r", "/v").unwrap(),
            "Dear <script>x</script>"
        );
        assert_eq!(
            c.render(Part::Html, &vars, 1000, "r", "/v").unwrap(),
            "<p>&lt;script&gt;x&lt;&#x2f;script&gt;</p>"
        );
    }

    #[test]
    fn strict_variables_name_the_missing_one() {
        let c = compile("Hi {{ name }}{% for i in range(2) %}{{ i }}{% endfor %}", None, None);
        let vars = Value::from_serialize(serde_json::json!({"other": 1}));
        let p = c
            .render(Part::Subject, &vars, 1000, "recipient 3", "/recipients/3/variables")
            .unwrap_err();
        assert_eq!(p.status, 400);
        assert_eq!(p.field.as_deref(), Some("/recipients/3/variables"));
        assert!(p.detail.contains("`name`"), "{}", p.detail);
        assert!(!p.detail.contains("`range`"), "{}", p.detail);
        assert!(p.detail.contains("recipient 3"), "{}", p.detail);
        // `is defined` stays usable under strict undefined.
        let c = compile(
            "{% if name is defined %}{{ name }}{% else %}friend{% endif %}",
            None,
            None,
        );
        assert_eq!(c.render(Part::Subject, &vars, 1000, "r", "/v").unwrap(), "friend");
    }

    #[test]
    fn syntax_errors_are_400_on_the_field() {
        let e = Compiled::compile("ok", Some("{% if %}"), None, |p| format!("/template/{}", p.name())).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.field.as_deref(), Some("/template/text"));
        let stored = StoredTemplate {
            subject: "Hi".into(),
            text: None,
            html: Some("{{ x".into()),
            updated: 0,
        };
        assert_eq!(validate(&stored).unwrap_err().field.as_deref(), Some("/html"));
    }

    #[test]
    fn hostile_templates_are_bounded() {
        let vars = Value::from_serialize(serde_json::json!({}));
        // Endless CPU: fuel runs out.
        let c = compile(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            None,
            None,
        );
        let e = c.render(Part::Subject, &vars, 1 << 20, "r", "/v").unwrap_err();
        assert_eq!(e.status, 400, "{e}");
        // Huge output: the writer stops it.
        let c = compile("{% for i in range(10000) %}{{ 'x' * 10000 }}{% endfor %}", None, None);
        let e = c.render(Part::Subject, &vars, 1 << 20, "r", "/v").unwrap_err();
        assert_eq!(e.status, 413, "{e}");
        // Just under the fuel of one render, many times: the call's budget.
        let c = compile("{% for i in range(100000) %}{% endfor %}", None, None);
        let mut n = 0;
        let e = loop {
            n += 1;
            assert!(n < 10_000, "no call budget");
            if let Err(e) = c.render(Part::Subject, &vars, 1 << 20, "r", "/v") {
                break e;
            }
        };
        assert!(e.detail.contains("in all"), "{e}");
        assert_eq!(e.field.as_deref(), Some("/subject"));
        assert!(n > 50, "{n} renders before the budget ran out");
        // Self-recursion: the recursion limit.
        let c = compile("{% include 'subject' %}", None, None);
        assert!(c.render(Part::Subject, &vars, 1 << 20, "r", "/v").is_err());
    }

    /// The constructs docs/api.md shows work under strict undefined.
    #[test]
    fn documented_constructs() {
        let c = compile(
            "{{ name | default('friend') }} {{ title | title }} {{ total | round(2) }} {% if vip is defined %}VIP{% endif %}",
            None,
            Some("{{ markup | safe }} {{ markup }}"),
        );
        let vars = Value::from_serialize(serde_json::json!({"title": "dr who", "total": 19.987, "markup": "<b>x</b>"}));
        assert_eq!(
            c.render(Part::Subject, &vars, 1000, "r", "/v").unwrap(),
            "friend Dr Who 19.99 "
        );
        assert_eq!(
            c.render(Part::Html, &vars, 1000, "r", "/v").unwrap(),
            "<b>x</b> &lt;b&gt;x&lt;&#x2f;b&gt;"
        );
    }

    #[test]
    fn names() {
        assert!(check_name("welcome-v2.en_US").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
