//! `GET /dashboard/`: the analysts' dashboard and the customers' portal. Static pages (plain ES
//! modules and CSS, `ingestor/dashboard/`) and the chart library (uPlot, vendored with its
//! licence) are built into the binary, so they work with no network; they call the same read
//! API as any client, with the key the user signs in with (kept in `sessionStorage`, sent as a
//! header, never in a URL). A portal token signs in to the same pages, which then show its
//! customer's usage, spend and balance only.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! assets {
    ($(($name:literal, $type:literal)),* $(,)?) => {
        &[$(Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../dashboard/", $name)),
        }),*]
    };
}

/// Every file the pages load; nothing else is served under `/dashboard/`.
const ASSETS: &[Asset] = assets![
    ("index.html", "text/html; charset=utf-8"),
    ("dashboard.css", "text/css; charset=utf-8"),
    ("app.js", "text/javascript; charset=utf-8"),
    ("api.js", "text/javascript; charset=utf-8"),
    ("dom.js", "text/javascript; charset=utf-8"),
    ("format.js", "text/javascript; charset=utf-8"),
    ("charts.js", "text/javascript; charset=utf-8"),
    ("views.js", "text/javascript; charset=utf-8"),
    (
        "vendor/uPlot-1.6.32.esm.js",
        "text/javascript; charset=utf-8"
    ),
    ("vendor/uPlot-1.6.32.min.css", "text/css; charset=utf-8"),
    ("vendor/uPlot-1.6.32.LICENSE", "text/plain; charset=utf-8"),
];

/// Only this origin, for scripts, styles, data and everything else: the pages cannot load or
/// send anything elsewhere, whatever a figure or an id contains.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// `/dashboard` without its slash: the pages' relative links need it.
pub async fn redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "/dashboard/"))
        .finish()
}

/// One embedded file; `/dashboard/` is `index.html`.
pub async fn asset(path: web::Path<String>) -> HttpResponse {
    let name = match path.as_str() {
        "" => "index.html",
        other => other,
    };
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return actix_web::ResponseError::error_response(&crate::error::ApiError::NotFound(
            format!("no dashboard file `{name}`; the dashboard starts at /dashboard/"),
        ));
    };
    HttpResponse::Ok()
        .content_type(asset.content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        // Small files, and a new binary may change them: revalidate, never serve stale pages.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(asset.body)
}
