//! Token and parameter extraction at the handshake: headers (Authorization,
//! Sec-WebSocket-Protocol, Origin, X-Forwarded-For) and the query string, all chosen by the
//! client. Any input gives parameters or a refusal, never a panic.
#![no_main]
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 5] = [
    "authorization",
    "sec-websocket-protocol",
    "origin",
    "x-forwarded-for",
    "cookie",
];

fuzz_target!(|data: &[u8]| {
    // Fields separated by 0xff: the query, then header values in NAMES order (repeating).
    let mut fields = data.split(|b| *b == 0xff);
    let query = fields.next().map(String::from_utf8_lossy);
    let mut headers = HeaderMap::new();
    for (i, value) in fields.enumerate() {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(NAMES[i % NAMES.len()]), v);
        }
    }
    let _ = imgate::auth::handshake::parse(&headers, query.as_deref());
    let trusted = imgate::auth::handshake::TrustedProxies::parse(&["0.0.0.0/0".into()]).unwrap();
    let _ = imgate::auth::handshake::client_ip([127, 0, 0, 1].into(), &headers, &trusted);
});
