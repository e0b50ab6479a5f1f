//! Stored templates of a tenant: `PUT`/`GET`/`DELETE
//! /api/v1/templates/{name}` and `GET /api/v1/templates`, replicated in
//! the control group (written through its leader).

use axum::extract::{Path, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tern_model::api::{Scope, StoredTemplate};
use tern_model::peer::Operation;

use super::auth::authenticate;
use super::extract::{decode, json, read_json_body, Api};
use super::problem::Problem;
use super::template::check_name;
use super::{not_found, unavailable, ApiResult, ApiState};

/// Longest template name.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateBody {
    subject: String,
    text: Option<String>,
    html: Option<String>,
}

#[derive(Serialize)]
struct Updated<'a> {
    name: &'a str,
    updated: i64,
}

#[derive(Serialize)]
struct TemplateView<'a> {
    name: &'a str,
    subject: &'a str,
    text: Option<&'a str>,
    html: Option<&'a str>,
    updated: i64,
}

pub async fn put(Api(state): Api, Path(name): Path<String>, request: Request) -> ApiResult {
    let (parts, body) = request.into_parts();
    let caller = authenticate(&state, &parts.headers)?;
    caller.require(Scope::TemplatesWrite)?;
    check_name(&name)?;
    let (bytes, _in_flight) = read_json_body(&state, &parts.headers, body).await?;
    let body: TemplateBody = decode(&bytes)?;
    let template = StoredTemplate {
        subject: body.subject,
        text: body.text,
        html: body.html,
        updated: super::now(),
    };
    super::template::validate(&template)?;
    let updated = template.updated;
    write(&state, caller.tenant(), &name, Some(template)).await?;
    tracing::info!(template = %name, tenant = %caller.tenant(), key = %caller.key.name, "api: template stored");
    Ok(json(StatusCode::OK, &Updated { name: &name, updated }))
}

pub async fn get(Api(state): Api, Path(name): Path<String>, headers: HeaderMap) -> ApiResult {
    let caller = authenticate(&state, &headers)?;
    caller.require(Scope::TemplatesRead)?;
    let t = state
        .control
        .template(caller.tenant(), &name)
        .ok_or_else(|| not_found("template", &name))?;
    Ok(json(
        StatusCode::OK,
        &TemplateView {
            name: &name,
            subject: &t.subject,
            text: t.text.as_deref(),
            html: t.html.as_deref(),
            updated: t.updated,
        },
    ))
}

pub async fn list(Api(state): Api, headers: HeaderMap) -> ApiResult {
    let caller = authenticate(&state, &headers)?;
    caller.require(Scope::TemplatesRead)?;
    let templates = state.control.templates(caller.tenant());
    let listed: Vec<Updated<'_>> = templates
        .iter()
        .map(|(name, t)| Updated {
            name,
            updated: t.updated,
        })
        .collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "templates": listed })))
}

pub async fn delete(Api(state): Api, Path(name): Path<String>, headers: HeaderMap) -> ApiResult {
    let caller = authenticate(&state, &headers)?;
    caller.require(Scope::TemplatesWrite)?;
    if state.control.template(caller.tenant(), &name).is_none() {
        return Err(not_found("template", &name).into());
    }
    write(&state, caller.tenant(), &name, None).await?;
    tracing::info!(template = %name, tenant = %caller.tenant(), key = %caller.key.name, "api: template deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn write(state: &ApiState, tenant: &str, name: &str, template: Option<StoredTemplate>) -> Result<(), Problem> {
    state
        .writer
        .write(Operation::Template {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            template,
        })
        .await
        .map_err(|e| unavailable(format!("writing the template: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn template_names_are_checked() {
        assert!(check_name("welcome-1.v2_b").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"a".repeat(65)).is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("ünï").is_err());
    }
}
