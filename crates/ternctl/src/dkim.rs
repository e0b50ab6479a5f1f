//! `ternctl dkim generate`: a DKIM key pair, its `[[dkim]]` entry and the
//! DNS TXT record to publish.

use std::process::ExitCode;

use serde_json::json;
use tern_config::keygen;
use tern_config::DkimAlgorithm;

use crate::cli::{DkimCommand, KeyAlgorithm};
use crate::output::print_json;

/// `ternctl dkim generate`: exit 0, 1 (key not written) or 2 (bad arguments).
pub fn command(cmd: &DkimCommand, json: bool) -> ExitCode {
    let DkimCommand::Generate {
        domain,
        selector,
        algorithm,
        bits,
        out,
    } = cmd;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let algorithm = match algorithm {
        KeyAlgorithm::Ed25519 => DkimAlgorithm::Ed25519Sha256,
        KeyAlgorithm::Rsa => DkimAlgorithm::RsaSha256,
    };
    let out = out
        .clone()
        .unwrap_or_else(|| format!("dkim-{domain}-{selector}.pem").into());
    let key_file = std::path::absolute(&out).unwrap_or_else(|_| out.clone());
    let snippet = format!(
        "[[dkim]]\ndomain = {}\nselector = {}\nalgorithm = \"{}\"\nprivate_key = {}\n",
        toml::Value::String(domain.clone()),
        toml::Value::String(selector.clone()),
        algorithm.name(),
        toml::Value::String(key_file.display().to_string()),
    );
    // The entry must be one ternd accepts: this checks domain and selector.
    if let Err(e) = tern_config::Config::from_toml(&snippet) {
        eprintln!("ternctl: {e}");
        return ExitCode::from(2);
    }
    if out.exists() {
        eprintln!("ternctl: {} exists; not overwriting it", out.display());
        return ExitCode::from(1);
    }
    let key = match keygen::generate(algorithm, *bits) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("ternctl: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = keygen::write_private_key(&out, &key.private_pem) {
        eprintln!("ternctl: cannot write {}: {e}", out.display());
        return ExitCode::from(1);
    }
    let txt_name = format!("{selector}._domainkey.{domain}");
    let txt_value = key.txt_value();
    if json {
        print_json(&json!({
            "domain": domain,
            "selector": selector,
            "algorithm": algorithm.name(),
            "key_file": key_file.display().to_string(),
            "txt_name": txt_name,
            "txt_value": txt_value,
            "txt_strings": keygen::txt_strings(&txt_value),
        }));
    } else {
        println!("Private key written to {} (mode 0600).\n", key_file.display());
        println!("Add to the ternd configuration:\n\n{snippet}");
        println!("Publish this DNS record before signing with the key:\n");
        println!("{txt_name}. IN TXT {}", keygen::zone_txt(&txt_value));
    }
    ExitCode::SUCCESS
}
