//! The `ternctl` binary's offline commands and exit codes, run as a process.
//! (Commands that ask a node are tested against real nodes in node/tests/e2e.)
//! This test target also makes `cargo test --workspace` build the binary
//! that node/tests/e2e and cluster-tests run from the target directory.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn ternctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ternctl")).args(args).output().unwrap()
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(ternctl(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(ternctl(&["stats", "--since", "5x"]).status.code(), Some(2));
    let out = ternctl(&["token", "new", "--name", "ops", "--role", "root"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn token_new_prints_an_entry_the_config_accepts() {
    let out = ternctl(&["-o", "json", "token", "new", "--name", "ops", "--role", "viewer"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["role"], "viewer");
    let entry = format!(
        "[[admin_token]]\nname = \"ops\"\nrole = \"viewer\"\nhash = \"{}\"\n",
        v["hash"].as_str().unwrap()
    );
    let config = tern_config::Config::from_toml(&entry).unwrap();
    assert_eq!(config.admin_tokens[0].name, "ops");
}

#[test]
fn dkim_generate_writes_the_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ed.pem");
    let key_arg = key.to_str().unwrap();
    let args = [
        "-o",
        "json",
        "dkim",
        "generate",
        "--domain",
        "Example.TEST.",
        "--selector",
        "s1",
        "--algorithm",
        "ed25519",
        "--out",
        key_arg,
    ];
    let out = ternctl(&args);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["domain"], "example.test");
    assert_eq!(v["txt_name"], "s1._domainkey.example.test");
    assert!(v["txt_value"].as_str().unwrap().starts_with("v=DKIM1; k=ed25519; p="));
    assert!(std::fs::read_to_string(&key)
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----\n"));
    // Never overwritten: exit 1.
    assert_eq!(ternctl(&args).status.code(), Some(1));
}
