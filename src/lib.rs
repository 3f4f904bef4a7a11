//! ferry: moves uploads from a spool directory to S3, verified, and serves them meanwhile.
//!
//! - `app`       wiring: open catalog, build store, run subsystems, ordered shutdown
//! - `crashpoint` debug-build crash points at each durable step (tests)
//! - `digest`    SHA-256 of whole files, the one hashing loop
//! - `config`    the Config tree, defaults, env overrides, validation
//! - `key`       Key: the only way a spool name or URL becomes a path or S3 key
//! - `media`     content types, and which of them a browser could run
//! - `catalog`   SQLite catalog: schema, migrations, the per-key state machine
//! - `store`     S3 client: put (single/multipart), head, get, presign, error classes
//! - `retry`     backoff policy and the transient/permanent split
//! - `sync`      watcher (ready files), uploader (hash, put, verify), archive
//! - `shared`    the shared catalog (PostgreSQL): outbox publishing, lookups, LISTEN/NOTIFY
//! - `serve`     HTTP front: one HTTP semantics (`serve::semantics`) over spool, cache, S3, archive
//! - `route`     the hash router: rendezvous ranking, health checks, proxying, failover
//! - `progress`  the terminal progress bar of `sync --once` and `verify`, log lines above it
//! - `telemetry` logging

pub mod app;
pub mod catalog;
pub mod config;
pub mod crashpoint;
pub mod digest;
pub mod key;
pub mod lease;
pub mod media;
pub mod progress;
pub mod retry;
pub mod route;
pub mod serve;
pub mod shared;
pub mod store;
pub mod sync;
pub mod telemetry;
