//! JWT verification: arbitrary token text, and arbitrary claims signed with the configured
//! secret (so parsing past the signature is reached). Any input gives an identity or an
//! error, never a panic.
#![no_main]
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use imgate::auth::Verifier;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzzing-secret-of-at-least-thirty-two-bytes";

fn verifier() -> &'static imgate::auth::jwt::JwtVerifier {
    static V: OnceLock<imgate::auth::jwt::JwtVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let cfg = imgate::config::AuthConfig::default();
        imgate::auth::jwt::JwtVerifier::from_config(&cfg, Some(SECRET.into())).unwrap()
    })
}

/// The verifier never awaits anything: one poll completes it.
fn now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("JWT verification awaited"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode % 2 == 0 {
        let _ = now(verifier().verify(&text));
    } else if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(rest) {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        if let Ok(token) = jsonwebtoken::encode(&header, &claims, &key) {
            let _ = now(verifier().verify(&token));
        }
    }
});
