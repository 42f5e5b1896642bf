//! The contract every `State` implementation passes.
