//! `ternctl cert`: the cluster's CA, node and client certificates (tern-pki).

use std::process::ExitCode;

use serde_json::json;

use crate::cli::CertCommand;
use crate::output::print_json;

/// `ternctl cert`: exit 0, 1 (nothing usable written: I/O, no CA) or 2 (a bad name or role).
pub fn command(cmd: &CertCommand, json: bool) -> ExitCode {
    use tern_pki::{self as pki, Ca, PkiError};
    let result = (|| -> Result<(String, Vec<std::path::PathBuf>), PkiError> {
        match cmd {
            CertCommand::InitCa { dir, name, days } => {
                std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let ca = Ca::generate(name, *days)?;
                let issued = pki::Issued {
                    cert_pem: ca.cert_pem(),
                    key_pem: ca.key_pem(),
                };
                let (cert, key) = pki::write_pair(dir, "ca", &issued)?;
                Ok((format!("CA {name:?}"), vec![cert, key]))
            }
            CertCommand::Node { dir, id, hosts, days } => {
                let issued = Ca::load(dir)?.issue_node(*id, hosts, *days)?;
                let (cert, key) = pki::write_pair(dir, &format!("node-{id}"), &issued)?;
                Ok((format!("node {id} (tern://node/{id})"), vec![cert, key]))
            }
            CertCommand::Client { dir, name, role, days } => {
                let role: pki::Role = role.parse()?;
                let issued = Ca::load(dir)?.issue_client(name, role, *days)?;
                let (cert, key) = pki::write_pair(dir, &format!("client-{name}"), &issued)?;
                Ok((format!("client {name} with role {role}"), vec![cert, key]))
            }
        }
    })();
    match result {
        Ok((what, files)) => {
            if json {
                print_json(&json!({
                    "issued": what,
                    "files": files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
                }));
            } else {
                println!("issued {what}");
                for f in &files {
                    println!("  wrote {}", f.display());
                }
            }
            ExitCode::SUCCESS
        }
        Err(e @ PkiError::BadName(_)) => {
            eprintln!("ternctl: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("ternctl: {e}");
            ExitCode::from(1)
        }
    }
}
