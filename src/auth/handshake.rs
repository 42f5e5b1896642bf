//! What a handshake carries: token (by source), codec, device, platform, since; and the
//! client address behind trusted proxies.
