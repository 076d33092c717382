//! Mutual-TLS plumbing for the gRPC listener, the public HTTPS side port,
//! gRPC clients, and a development PKI.

pub mod client;
pub mod devpki;
pub mod error;
pub mod identity;
pub mod incoming;
pub mod server;
mod verifier;

pub use client::{connect, endpoint, ClientTlsFiles};
pub use devpki::{ensure_dev_pki, ClientProfile, DevPki, TRUST_DOMAIN};
pub use error::TlsError;
pub use identity::{identity_from_cert, identity_with, IdentityFallback, IdentityRules};
pub use incoming::{incoming, ConnInfo, ListenerLimits, Slots, TlsConn};
pub use server::{ServerTls, TlsOptions, TlsPaths};

#[cfg(test)]
mod tests;
