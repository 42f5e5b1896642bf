//! TLS material: the generated dev certificate (ECDSA P-256, at most 14 days, rotated),
//! configured PEM files (reloaded on change), the `/cert-hash` document, rustls configs.
