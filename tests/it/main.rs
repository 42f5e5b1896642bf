//! Behaviour tests against an in-process gateway with real clients over loopback.

mod alerts;
mod auth;
mod chaos;
mod cli;
mod cluster;
mod codec;
mod common;
mod delivery;
mod grafana;
mod grpc;
mod limits;
mod ops;
mod policy;
mod prometheus;
mod python;
mod revocation;
mod state;
mod webtransport;
