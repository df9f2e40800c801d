//! The OpenAPI document (`GET /openapi.json`) and its interactive docs (`/docs`, Swagger UI
//! served from the binary: nothing is fetched at build time or at run time).
//!
//! Every path is declared on its handler with `#[utoipa::path]`; this module only lists them.
//! `openapi/openapi.json` at the repository root is this document, checked in; a test fails
//! when the two differ (`mcp-meter openapi > openapi/openapi.json` brings it up to date).

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mcp-meter",
        description = "Usage metering for paid MCP servers: ingest one event per tool call, price it \
from the tenant's rate plan, enforce hard limits and margin levels, and read analytics and billing \
exports back. Money is integer micro-USD (µUSD); times are UTC, RFC 3339 on the wire. The API key \
alone decides the tenant; a portal token (`POST /v1/portal/tokens`) reads for one customer of it.",
        license(name = "Apache-2.0")
    ),
    paths(
        crate::ingest::batch,
        crate::ingest::events,
        crate::guard::check,
        crate::guard::states,
        crate::credits::authorize,
        crate::credits::release,
        crate::credits::grant,
        crate::credits::balance,
        crate::analytics::by_tool,
        crate::analytics::by_agent,
        crate::analytics::by_customer,
        crate::analytics::summary,
        crate::analytics::sessions,
        crate::analytics::timeseries,
        crate::analytics::session,
        crate::exports::billing,
        crate::portal::issue,
        crate::ops::index,
        crate::ops::healthz,
        crate::ops::readyz,
        crate::ops::metrics,
    ),
    // Schemas only parameters use are not collected on their own.
    components(schemas(
        crate::exports::Format,
        schemas::analytics::Interval,
        schemas::analytics::GroupBy
    )),
    modifiers(&Security),
    tags(
        (name = "ingest", description = "Usage events and heartbeats (scope `ingest`)"),
        (name = "guard", description = "The pre-execution check (scope `ingest`) and the margin levels behind it (scope `read`)"),
        (name = "credits", description = "Charge before the tool runs: prepaid grants (scope `admin`), balances (scope `read`), authorize and release (scope `ingest`)"),
        (name = "analytics", description = "Usage read back from the rollups (scope `read`; a portal token reads its customer's only)"),
        (name = "exports", description = "Billing exports for finance (scope `export`; a portal token exports its customer's lines only)"),
        (name = "portal", description = "Read-only tokens for one customer's portal (scope `admin`)"),
        (name = "operations", description = "Health and readiness (no key)"),
    )
)]
pub struct ApiDoc;

/// The two ways to present a key, and the portal token, which reads one customer's rows in
/// the `customer` view (operations that take one list it).
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "An API key; `mcp-meter keys new --scopes ingest,read` makes one. Its scopes \
(`ingest`, `read`, `export`, `admin`) decide which operations it may call, each operation naming \
the one it needs; `admin` holds every other scope too, so an admin key may call every operation",
            ))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The same key as `Authorization: Bearer <key>`, with the same scopes \
(`admin` holds every other scope)",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "portal_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A portal token (`mcpp_…`, from `POST /v1/portal/tokens`), sent like a key. \
It reads one customer's rows only, and its JSON answers are in the `customer` view, which has \
no COGS, gross profit or margin",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as served and as checked in: pretty JSON with a final newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}
