//! The client-certificate verifier of the gRPC listener: rustls' WebPKI
//! verifier (chain to `tls.client_ca`, validity, revocation by the CRLs of
//! `tls.crls`), plus the identity rule. A certificate that chains but names
//! no identity, or several, fails the handshake itself, with a TLS alert the
//! client sees and a log line naming the peer's reason, never a connection
//! that is accepted and then dropped.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use super::identity::{identity_with, IdentityRules};

/// WebPKI verification, then the identity rule.
pub(crate) struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rules: IdentityRules,
}

impl IdentityVerifier {
    pub(crate) fn new(inner: Arc<dyn ClientCertVerifier>, rules: IdentityRules) -> IdentityVerifier {
        IdentityVerifier { inner, rules }
    }
}

impl fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityVerifier")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &verified {
            tracing::info!(error = %e, "client certificate refused");
            return verified;
        }
        if let Err(e) = identity_with(end_entity.as_ref(), &self.rules) {
            tracing::warn!(error = %e, "client certificate refused: it names no single identity");
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        verified
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
