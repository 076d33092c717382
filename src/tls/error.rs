//! Error type for the TLS module.

use std::path::PathBuf;

/// Everything that can go wrong loading, generating or using TLS material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory could not be created or written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no CERTIFICATE block.
    #[error("{path}: no certificate found")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no private key block.
    #[error("{path}: no private key found")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// Material was found but is unusable (bad PEM/DER, mismatched key, ...).
    #[error("{path}: {reason}")]
    Invalid {
        /// The file (or a `<...>` placeholder for in-memory material).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused to build a configuration.
    #[error("{path}: tls configuration rejected: {source}")]
    Rustls {
        /// The file the rejected material came from.
        path: PathBuf,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate carries no usable identity: no URI SAN, and no DNS SAN
    /// or CN the config allows instead.
    #[error("certificate has no identity: no URI SAN (and no DNS SAN or CN allowed by tls.identity_fallback)")]
    NoIdentity,
    /// A certificate names more than one identity.
    #[error("certificate identity is ambiguous: {reason}")]
    AmbiguousIdentity {
        /// What it names.
        reason: String,
    },
    /// A certificate could not be parsed when extracting its identity.
    #[error("certificate cannot be parsed: {reason}")]
    BadCertificate {
        /// The parser's complaint.
        reason: String,
    },
    /// The gRPC endpoint URI or the client TLS settings are unusable.
    #[error("endpoint {endpoint}: {reason}")]
    Endpoint {
        /// The endpoint URI as given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting to the gRPC endpoint failed.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        /// The endpoint URI as given.
        endpoint: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}
