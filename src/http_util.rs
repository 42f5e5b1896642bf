//! Small HTTP responses shared by the public listener and the ops listener.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
