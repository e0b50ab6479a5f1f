//! `ternctl apikey create|list|revoke` against a real ternd (docs/operations.md,
//! "API keys"): the key is printed once and never again, names are unique
//! among live keys, only the admin role may change keys, and every change
//! is audited.

use std::process::{Command, Output};

use crate::harness::*;

/// ternctl's exit codes (crates/ternctl/src/main.rs).
const FAILED: i32 = 1;
const NOT_FOUND: i32 = 3;
const NOT_PERMITTED: i32 = 4;

const ADMIN: &str = "admin-5e1d7a90c4";
const OPERATOR: &str = "operator-2b8f61d3";

/// ternctl against `node` with token `token` and nothing from the test's
/// own environment.
fn ctl(node: &Node, token: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(ternctl_bin());
    for var in ["TERN_TOKEN", "TERN_TLS_CA", "TERN_TLS_CERT", "TERN_TLS_KEY"] {
        cmd.env_remove(var);
    }
    cmd.arg("--endpoint")
        .arg(node.grpc.to_string())
        .args(args)
        .env("TERN_TOKEN", token)
        .output()
        .expect("run ternctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    text(&out.stdout)
}

#[track_caller]
fn json(out: &Output, what: &str) -> serde_json::Value {
    serde_json::from_str(&ok(out, what)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Whether `key` is shaped as documented: `tern_<16 hex>_<43 base64url>`.
fn well_formed(key: &str) -> bool {
    let Some(rest) = key.strip_prefix("tern_") else {
        return false;
    };
    let (id, secret) = rest.split_at(16.min(rest.len()));
    id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && secret.len() == 44
        && secret.starts_with('_')
        && secret[1..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[test]
fn ternctl_creates_lists_and_revokes_api_keys() {
    let mut extra = String::new();
    for (name, role, secret) in [("boss", "admin", ADMIN), ("ops", "operator", OPERATOR)] {
        extra.push_str(&format!(
            "[[admin_token]]\nname = \"{name}\"\nrole = \"{role}\"\nhash = \"{}\"\n\n",
            hash_password(secret)
        ));
    }
    let node = Node::start(&extra);

    // The table form: the key once, with the warning to store it.
    let table = ok(
        &ctl(
            &node,
            ADMIN,
            &[
                "apikey", "create", "--name", "ci", "--scope", "send", "--tenant", "acme", "--rate", "50",
            ],
        ),
        "create ci",
    );
    assert!(table.contains("it is not shown again"), "{table}");
    let ci_key = table
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .unwrap_or_else(|| panic!("no key line in {table}"))
        .trim()
        .to_owned();
    assert!(well_formed(&ci_key), "{ci_key}");
    let ci_id = ci_key[5..21].to_owned();
    let row = table.lines().find(|l| l.starts_with(&ci_id)).expect("the key's row");
    for cell in ["ci", "acme", "send", "50/s"] {
        assert!(row.contains(cell), "{cell} in {row}");
    }

    // The JSON form, with the default scopes.
    let web = json(
        &ctl(&node, ADMIN, &["apikey", "create", "--name", "web", "-o", "json"]),
        "create web",
    );
    let web_key = web["key"].as_str().expect("key").to_owned();
    assert!(well_formed(&web_key), "{web}");
    assert_eq!(web["name"], "web");
    assert_eq!(web["id"].as_str(), Some(&web_key[5..21]));
    assert_eq!(web["tenant"], "");
    assert_eq!(web["rate"], 0);
    assert_eq!(
        web["scopes"],
        serde_json::json!(["send", "templates:read", "templates:write"])
    );
    assert!(web["revoked"].is_null());
    assert_ne!(web_key, ci_key);

    // A live name is taken; an unknown scope is refused; an operator may not.
    let taken = ctl(&node, ADMIN, &["apikey", "create", "--name", "ci"]);
    assert_eq!(taken.status.code(), Some(FAILED), "{}", text(&taken.stderr));
    assert!(
        text(&taken.stderr).contains("an API key named ci exists"),
        "{}",
        text(&taken.stderr)
    );
    let bad = ctl(&node, ADMIN, &["apikey", "create", "--name", "x", "--scope", "admin"]);
    assert_eq!(bad.status.code(), Some(FAILED));
    assert!(text(&bad.stderr).contains("unknown scope"), "{}", text(&bad.stderr));
    let refused = ctl(&node, OPERATOR, &["apikey", "create", "--name", "sneaky"]);
    assert_eq!(refused.status.code(), Some(NOT_PERMITTED), "{}", text(&refused.stderr));
    assert_eq!(
        ok(&ctl(&node, OPERATOR, &["apikey", "list"]), "operator list")
            .matches("\n")
            .count(),
        3,
        "an operator may list: a header and two keys"
    );

    // Listings never show a secret.
    let secrets = [&ci_key[22..], &web_key[22..]];
    let list = json(&ctl(&node, ADMIN, &["apikey", "list", "-o", "json"]), "list");
    let keys = list["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2, "{list}");
    let listed_table = ok(&ctl(&node, ADMIN, &["apikey", "list"]), "list table");
    for out in [list.to_string(), listed_table.clone()] {
        for s in secrets {
            assert!(!out.contains(s), "a secret in the listing: {out}");
        }
        assert!(!out.contains("hash"), "{out}");
    }
    let ci = keys.iter().find(|k| k["name"] == "ci").expect("ci listed");
    assert_eq!(ci["id"].as_str(), Some(ci_id.as_str()));
    assert_eq!(ci["tenant"], "acme");
    assert_eq!(ci["scopes"], serde_json::json!(["send"]));
    assert_eq!(ci["rate"], 50);
    assert!(ci["created"].as_i64().unwrap_or(0) > 1_700_000_000);

    // Revoke by name (table), then by id (JSON); the name is free again.
    let out = ok(&ctl(&node, ADMIN, &["apikey", "revoke", "ci"]), "revoke ci");
    assert!(out.contains(&format!("revoked API key ci ({ci_id})")), "{out}");
    let again = ctl(&node, ADMIN, &["apikey", "revoke", &ci_id]);
    assert_eq!(again.status.code(), Some(FAILED), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("already revoked"));
    let unknown = ctl(&node, ADMIN, &["apikey", "revoke", "nobody"]);
    assert_eq!(unknown.status.code(), Some(NOT_FOUND));
    let web_id = web["id"].as_str().expect("id");
    let revoked = json(
        &ctl(&node, ADMIN, &["apikey", "revoke", web_id, "-o", "json"]),
        "revoke web",
    );
    assert!(revoked["revoked"].as_i64().is_some(), "{revoked}");
    let ci2 = json(
        &ctl(&node, ADMIN, &["apikey", "create", "--name", "ci", "-o", "json"]),
        "ci again",
    );
    assert_ne!(ci2["id"].as_str(), Some(ci_id.as_str()));
    let list = json(&ctl(&node, ADMIN, &["apikey", "list", "-o", "json"]), "list");
    let states: Vec<(String, bool)> = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| (k["name"].as_str().unwrap_or("").to_owned(), k["revoked"].is_null()))
        .collect();
    assert_eq!(states.len(), 3, "{list}");
    assert_eq!(
        states.iter().filter(|(_, live)| *live).count(),
        1,
        "only the new ci is live: {states:?}"
    );

    // Every change is audited (also the refused one), and no log line
    // holds a secret.
    let logs = node.logs();
    let audited = |action: &str, result: &str| {
        logs.lines()
            .any(|l| l.contains("event=\"admin\"") && l.contains(&format!("action=\"{action}\"")) && l.contains(result))
    };
    assert!(audited("apikey create", "result=\"ok\""), "{logs}");
    assert!(audited("apikey create", "result=\"refused\""), "{logs}");
    assert!(audited("apikey create", "result=\"failed\""), "name taken: {logs}");
    assert!(audited("apikey revoke", "result=\"ok\""), "{logs}");
    for s in secrets {
        assert!(!logs.contains(s), "a secret in the log");
    }
}
