//! `ternctl apikey create|list|revoke`: keys of the sending API. `create`
//! prints the key once: the cluster keeps only its SHA-256.

use serde_json::json;
use tern_proto::admin::{ApiKeyCreateRequest, ApiKeyInfo, ApiKeyListRequest, ApiKeyRevokeRequest};

use crate::cli::ApiKeyCommand;
use crate::connect::Client;
use crate::output::{print_json, print_table, time};

pub async fn run(client: &mut Client, cmd: ApiKeyCommand, json: bool) -> Result<(), tonic::Status> {
    match cmd {
        ApiKeyCommand::Create {
            name,
            scopes,
            tenant,
            rate,
        } => {
            let r = client
                .api_key_create(ApiKeyCreateRequest {
                    name,
                    scopes,
                    tenant,
                    rate,
                })
                .await?
                .into_inner();
            let info = r.info.unwrap_or_default();
            if json {
                let mut v = info_json(&info);
                v["key"] = json!(r.key);
                print_json(&v);
            } else {
                print_table(&HEADERS, &[row(&info)]);
                println!();
                println!("key: {}", r.key);
                println!("Store it now: it is not shown again (the cluster keeps only its hash).");
            }
        }
        ApiKeyCommand::List => {
            let r = client.api_key_list(ApiKeyListRequest {}).await?.into_inner();
            if json {
                print_json(&json!({"keys": r.keys.iter().map(info_json).collect::<Vec<_>>()}));
            } else {
                let rows: Vec<Vec<String>> = r.keys.iter().map(row).collect();
                print_table(&HEADERS, &rows);
            }
        }
        ApiKeyCommand::Revoke { key } => {
            let r = client.api_key_revoke(ApiKeyRevokeRequest { key }).await?.into_inner();
            let info = r.info.unwrap_or_default();
            if json {
                print_json(&info_json(&info));
            } else {
                println!("revoked API key {} ({})", info.name, info.id);
            }
        }
    }
    Ok(())
}

const HEADERS: [&str; 7] = ["ID", "NAME", "TENANT", "SCOPES", "RATE", "CREATED", "REVOKED"];

fn row(k: &ApiKeyInfo) -> Vec<String> {
    vec![
        k.id.clone(),
        k.name.clone(),
        if k.tenant.is_empty() {
            "(default)".into()
        } else {
            k.tenant.clone()
        },
        k.scopes.join(","),
        if k.rate == 0 {
            "-".into()
        } else {
            format!("{}/s", k.rate)
        },
        time(k.created),
        if k.revoked == 0 { "-".into() } else { time(k.revoked) },
    ]
}

fn info_json(k: &ApiKeyInfo) -> serde_json::Value {
    json!({
        "id": k.id,
        "name": k.name,
        "tenant": k.tenant,
        "scopes": k.scopes,
        "rate": k.rate,
        "created": k.created,
        "revoked": if k.revoked == 0 { None } else { Some(k.revoked) },
    })
}
