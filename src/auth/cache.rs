//! The token cache: bounded, positive entries live until min(ttl, exp), negative ones for
//! `negative_ttl`. Keys are SHA-256 digests of the token, never the token itself.
pub struct TokenCache {}
