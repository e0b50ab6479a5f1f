//! The OpenAPI 3.1 document of `/api/v1/` (served at
//! `GET /api/v1/openapi.json`). Hand-kept JSON: the tests below hold it to
//! the request types and the paths of docs/api.md.

pub const DOCUMENT: &str = include_str!("openapi.json");

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::compose::{self, ComposeCtx, RawRequest, SendRequest};
    use serde_json::Value;

    fn doc() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    #[test]
    fn is_openapi_3_1_with_bearer_auth() {
        let d = doc();
        assert_eq!(d["openapi"], "3.1.0");
        assert_eq!(d["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(d["security"][0]["bearer"], serde_json::json!([]));
        // The document itself is public.
        assert_eq!(
            d["paths"]["/api/v1/openapi.json"]["get"]["security"],
            serde_json::json!([])
        );
    }

    #[test]
    fn every_path_and_method_is_described() {
        let d = doc();
        let expected = [
            ("/api/v1/messages", "post", "200"),
            ("/api/v1/messages/raw", "post", "200"),
            ("/api/v1/messages/{id}", "get", "200"),
            ("/api/v1/messages/{id}", "delete", "200"),
            ("/api/v1/batches/{id}", "get", "200"),
            ("/api/v1/batches/{id}", "delete", "200"),
            ("/api/v1/templates", "get", "200"),
            ("/api/v1/templates/{name}", "put", "200"),
            ("/api/v1/templates/{name}", "get", "200"),
            ("/api/v1/templates/{name}", "delete", "204"),
            ("/api/v1/openapi.json", "get", "200"),
        ];
        for (path, method, ok) in expected {
            let op = &d["paths"][path][method];
            assert!(op.is_object(), "{method} {path} missing");
            assert!(op["responses"][ok].is_object(), "{method} {path} has no {ok}");
            if path != "/api/v1/openapi.json" {
                assert!(op["responses"]["401"].is_object(), "{method} {path} has no 401");
            }
        }
        let described: usize = d["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().keys().filter(|k| *k != "parameters").count())
            .sum();
        assert_eq!(described, expected.len(), "an operation not in docs/api.md");
    }

    /// Every `$ref` points at something that exists.
    #[test]
    fn references_resolve() {
        fn walk(v: &Value, root: &Value, seen: &mut usize) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        let pointer = r.strip_prefix('#').expect("local ref");
                        assert!(root.pointer(pointer).is_some(), "dangling {r}");
                        *seen += 1;
                    }
                    m.values().for_each(|x| walk(x, root, seen));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, root, seen)),
                _ => {}
            }
        }
        let d = doc();
        let mut seen = 0;
        walk(&d, &d, &mut seen);
        assert!(seen > 50, "{seen} refs");
    }

    /// The fields serde accepts, from its `deny_unknown_fields` error.
    fn accepted_fields<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let err = serde_json::from_str::<T>(r#"{"no_such_field": 1}"#)
            .unwrap_err()
            .to_string();
        let expected = err.split("expected one of ").nth(1).expect(&err);
        let mut fields: Vec<String> = expected
            .split(", ")
            .map(|f| {
                f.trim_matches(|c: char| c == '`' || c.is_whitespace())
                    .split('`')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        fields.sort();
        fields
    }

    fn schema_fields(d: &Value, name: &str) -> Vec<String> {
        let mut fields: Vec<String> = d["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        fields.sort();
        fields
    }

    #[test]
    fn request_schemas_match_the_request_types() {
        let d = doc();
        assert_eq!(schema_fields(&d, "SendRequest"), accepted_fields::<SendRequest>());
        assert_eq!(schema_fields(&d, "RawRequest"), accepted_fields::<RawRequest>());
        assert_eq!(
            schema_fields(&d, "Recipient"),
            accepted_fields::<compose::RecipientSpec>()
        );
        assert_eq!(
            schema_fields(&d, "Attachment"),
            accepted_fields::<compose::Attachment>()
        );
    }

    /// The examples are requests compose() accepts.
    #[test]
    fn examples_compose() {
        let d = doc();
        let ctx = ComposeCtx {
            hostname: "mta.example.org".into(),
            // 2030-01-15T08:00:00Z: the templated example is an hour ahead.
            now: 1_894_694_400,
            max_recipients: 100,
            max_message_size: 1 << 20,
            max_schedule_ahead: std::time::Duration::from_secs(72 * 3600),
        };
        let examples = d["paths"]["/api/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["examples"]
            .as_object()
            .unwrap()
            .clone();
        assert!(examples.contains_key("smallest") && examples.contains_key("templated_batch"));
        let stored = tern_model::api::StoredTemplate {
            subject: "Welcome, {{ name }}".into(),
            text: Some("Hello {{ name }}".into()),
            html: None,
            updated: 0,
        };
        for (name, example) in examples {
            let req: SendRequest = serde_json::from_value(example["value"].clone()).expect(&name);
            let messages = compose::compose(&req, Some(&stored), &ctx).expect(&name);
            assert!(!messages.is_empty(), "{name}");
        }
        let raw = &d["paths"]["/api/v1/messages/raw"]["post"]["requestBody"]["content"]["application/json"]["example"];
        let req: RawRequest = serde_json::from_value(raw.clone()).unwrap();
        compose::compose_raw(&req, &ctx).unwrap();
    }
}
