//! keyward: a custodial key-management and signing daemon. Account keys are
//! wrapped under a key-encryption key that never leaves a PKCS#11 HSM; the
//! daemon signs EIP-712 typed data and messages over mutual-TLS gRPC, only
//! for callers its rules allow.
//!
//! Modules follow the request path: `tls` (who is calling) → `api` (decode,
//! validate, map errors) → `policy` (may they: Cedar) → `keys` (custody and signing)
//! → `hsm` (the only cryptoki caller) and `store` (persistent state); every
//! request ends with one hash-chained `audit` event.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod crypto;
pub mod dev;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod hsm;
pub mod http;
pub mod issuer;
pub mod jwks;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod receipt;
pub mod server;
pub mod session;
pub mod soak;
pub mod store;
pub mod telemetry;
pub mod testkit;
pub mod tls;
pub mod types;
