//! `ternctl token new`: an operator token and its `[[admin_token]]` entry.

use std::process::ExitCode;

use serde_json::json;

use crate::cli::TokenCommand;
use crate::output::print_json;

/// `ternctl token new`: exit 0, 1 (no hash made) or 2 (a bad name or role).
pub fn command(cmd: &TokenCommand, json: bool) -> ExitCode {
    let TokenCommand::New { name, role } = cmd;
    if let Err(e) = tern_pki::check_client_name(name) {
        eprintln!("ternctl: {e}");
        return ExitCode::from(2);
    }
    let role: tern_pki::Role = match role.parse() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(2);
        }
    };
    use base64::Engine as _;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let hash = match tern_config::hash_password(secret.as_bytes()) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        print_json(&json!({"name": name, "role": role.as_str(), "token": secret, "hash": hash}));
    } else {
        println!("Token (give it to {name}; it is shown only now):\n\n{secret}\n");
        println!("Add to every node's configuration:\n");
        println!(
            "[[admin_token]]\nname = {}\nrole = \"{role}\"\nhash = \"{hash}\"",
            toml::Value::String(name.clone())
        );
    }
    ExitCode::SUCCESS
}
