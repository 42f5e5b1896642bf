//! In-memory state: the embedded default, fit for single-node production.
