//! The web console: a page and its script and style, embedded in the binary (it works offline)
//! and drawn in the browser from the HTTP API.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");
/// The charting library (uPlot, MIT; see console/vendor/README).
const CHARTS: &str = include_str!("console/vendor/uPlot.iife.min.js");
const CHARTS_STYLE: &str = include_str!("console/vendor/uPlot.min.css");

/// The console's files by path; 404 for others.
pub async fn asset(uri: axum::http::Uri) -> Response {
    let (body, kind) = match uri.path() {
        "/" | "/console" | "/console/" => (INDEX, "text/html; charset=utf-8"),
        "/console/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/console/console.css" => (STYLE, "text/css; charset=utf-8"),
        "/console/uPlot.iife.min.js" => (CHARTS, "text/javascript; charset=utf-8"),
        "/console/uPlot.min.css" => (CHARTS_STYLE, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such console file").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
