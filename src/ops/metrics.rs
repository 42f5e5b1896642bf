//! Prometheus metrics (SPEC §8): every series registered and touched at zero at start.
