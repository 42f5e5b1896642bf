//! JWT verification (HS256, RS256, ES256) and issuing (HS256, for `imgate token` and `/dev/token`).
