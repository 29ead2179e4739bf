//! `GET /` on the admin listener: the status page, one self-contained HTML document
//! (inline CSS and JS, no external asset) that polls the JSON endpoints of the same listener.

use http::{Response, StatusCode};

const PAGE: &str = include_str!("status.html");

/// Inline script and style only, fetches to this listener only, nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:";

pub(super) fn page() -> Response<Vec<u8>> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(http::header::CACHE_CONTROL, "no-store")
        .header(http::header::CONTENT_SECURITY_POLICY, CSP)
        .header(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(http::header::CONTENT_LENGTH, PAGE.len())
        .body(PAGE.as_bytes().to_vec())
        .expect("static response parts are valid")
}
