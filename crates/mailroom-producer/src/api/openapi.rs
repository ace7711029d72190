//! The OpenAPI document, generated from the handlers' annotations and
//! served at `GET /openapi.json`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use mailroom_core::validate::Limits;
use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{ApiState, messages, schema};

/// Every route the router serves, as (method, path): the test of the
/// document checks both against it.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/messages"),
    ("post", "/v1/messages/batch"),
    ("get", "/v1/messages/{id}"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "mailroom",
        description = "Queue-backed email sending: validated, sealed and confirmed before 202. Errors are application/problem+json (RFC 9457)."
    ),
    paths(
        messages::send_one,
        messages::send_batch,
        messages::status,
        super::healthz,
        super::ready,
        super::render_metrics,
        openapi_json,
    ),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key (mr_live_...) or, when configured, a JWT"))
                    .build(),
            ),
        );
    }
}

/// `GET /openapi.json`
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document")))]
pub async fn openapi_json(
    State(state): State<Arc<ApiState>>,
) -> ([(header::HeaderName, &'static str); 1], Bytes) {
    (
        [(header::CONTENT_TYPE, "application/json")],
        // A shared buffer: the answer copies nothing.
        state.openapi.clone(),
    )
}

/// The document for a server with these limits: [`ApiDoc`], with the
/// request bodies' schemas (see the `schema` module) in place of the
/// free-form objects the handlers' annotations name.
pub fn document(limits: &Limits, max_batch: usize) -> Bytes {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
    doc["components"]["schemas"]["JobRequest"] = schema::job_request(limits);
    doc["components"]["schemas"]["Batch"] = schema::batch(max_batch);
    for (path, name) in [
        ("/v1/messages", "JobRequest"),
        ("/v1/messages/batch", "Batch"),
    ] {
        doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"] =
            json!({ "$ref": format!("#/components/schemas/{name}") });
    }
    Bytes::from(doc.to_string())
}
