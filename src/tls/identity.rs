//! Derive a caller identity from a verified client certificate.
//!
//! By default the identity is the certificate's one URI SAN (a SPIFFE id
//! such as `spiffe://example.org/marketplace`): a certificate with none, or
//! with several, has no identity and is refused during the TLS handshake.
//! A DNS SAN or the subject CN counts only where the config allows it
//! (`tls.identity_fallback`), and then with a type prefix (`dns:` or `cn:`),
//! so that no DNS name or CN can ever equal a URI identity.

use serde::Deserialize;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::error::TlsError;

/// What else than a URI SAN may name a client (`tls.identity_fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityFallback {
    /// The certificate's one DNS SAN, as `dns:<name>`, when it has no URI SAN.
    Dns,
    /// The subject's one CN, as `cn:<name>`, when it has no URI SAN (and no
    /// DNS SAN, or DNS is not allowed).
    Cn,
}

/// How identities are read from client certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRules {
    /// Allowed fallbacks, tried in order, for certificates without a URI SAN.
    pub fallback: Vec<IdentityFallback>,
}

/// The identity a certificate speaks for under the default rules: its one
/// URI SAN.
pub fn identity_from_cert(der: &[u8]) -> Result<String, TlsError> {
    identity_with(der, &IdentityRules::default())
}

/// The identity a certificate speaks for: its one URI SAN; without one, the
/// first allowed fallback that names exactly one value (`dns:<name>`,
/// `cn:<name>`). Several URI SANs (or several values of a fallback) are
/// ambiguous and refused, never resolved by position.
pub fn identity_with(der: &[u8], rules: &IdentityRules) -> Result<String, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate { reason: e.to_string() })?;
    let san = cert.subject_alternative_name().map_err(|e| TlsError::BadCertificate {
        reason: format!("subjectAltName: {e}"),
    })?;
    let names: &[GeneralName<'_>] = san.as_ref().map_or(&[], |s| s.value.general_names.as_slice());
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] if !one.is_empty() => return Ok((*one).to_owned()),
        [] => {}
        _ => {
            return Err(TlsError::AmbiguousIdentity {
                reason: format!("{} URI SANs; exactly one names a client", uris.len()),
            })
        }
    }
    for fallback in &rules.fallback {
        let values: Vec<String> = match fallback {
            IdentityFallback::Dns => names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            IdentityFallback::Cn => cert
                .subject()
                .iter_common_name()
                .map(|cn| {
                    cn.as_str().map(str::to_owned).map_err(|e| TlsError::BadCertificate {
                        reason: format!("subject CN: {e}"),
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let prefix = match fallback {
            IdentityFallback::Dns => "dns",
            IdentityFallback::Cn => "cn",
        };
        match values.as_slice() {
            [] => continue,
            [one] if !one.is_empty() => return Ok(format!("{prefix}:{one}")),
            _ => {
                return Err(TlsError::AmbiguousIdentity {
                    reason: format!("{} {prefix} names and no URI SAN", values.len()),
                })
            }
        }
    }
    Err(TlsError::NoIdentity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::devpki::{issue, new_ca, CertSpec};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use time::{Duration, OffsetDateTime};

    fn der(cn: &str, uri: Option<&str>, dns: &[&str]) -> Vec<u8> {
        let uris: Vec<&str> = uri.into_iter().collect();
        der_uris(cn, &uris, dns)
    }

    fn der_uris(cn: &str, uris: &[&str], dns: &[&str]) -> Vec<u8> {
        let (ca_cert, ca_key) = new_ca("test CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let spec = CertSpec {
            common_name: cn.to_owned(),
            uri_sans: uris.iter().map(|u| (*u).to_owned()).collect(),
            dns_sans: dns.iter().map(|d| (*d).to_owned()).collect(),
            not_before: now,
            not_after: now + Duration::days(1),
            client: true,
            server: false,
        };
        let (pem, _) = issue(&ca_cert, &ca_key, &spec).unwrap();
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn both() -> IdentityRules {
        IdentityRules {
            fallback: vec![IdentityFallback::Dns, IdentityFallback::Cn],
        }
    }

    #[test]
    fn the_one_uri_san_is_the_identity() {
        let d = der("cn", Some("spiffe://example.org/a"), &["a.example.org"]);
        assert_eq!(identity_from_cert(&d).unwrap(), "spiffe://example.org/a");
        assert_eq!(identity_with(&d, &both()).unwrap(), "spiffe://example.org/a");
    }

    #[test]
    fn several_uri_sans_are_refused() {
        let d = der_uris("x", &["spiffe://example.org/a", "spiffe://example.org/admin"], &[]);
        assert!(matches!(
            identity_from_cert(&d),
            Err(TlsError::AmbiguousIdentity { .. })
        ));
        assert!(matches!(
            identity_with(&d, &both()),
            Err(TlsError::AmbiguousIdentity { .. })
        ));
    }

    #[test]
    fn dns_and_cn_count_only_when_allowed_and_typed() {
        // A SPIFFE string as CN or DNS SAN never becomes that identity.
        let cn_only = der("spiffe://example.org/admin", None, &[]);
        assert!(matches!(identity_from_cert(&cn_only), Err(TlsError::NoIdentity)));
        assert_eq!(
            identity_with(&cn_only, &both()).unwrap(),
            "cn:spiffe://example.org/admin"
        );
        let dns = der("svc", None, &["127.0.0.1", "a.example.org"]);
        assert!(matches!(identity_from_cert(&dns), Err(TlsError::NoIdentity)));
        assert_eq!(identity_with(&dns, &both()).unwrap(), "dns:a.example.org");
        let cn_rules = IdentityRules {
            fallback: vec![IdentityFallback::Cn],
        };
        assert_eq!(identity_with(&dns, &cn_rules).unwrap(), "cn:svc");
        let two_dns = der("svc", None, &["a.example.org", "b.example.org"]);
        assert!(matches!(
            identity_with(&two_dns, &both()),
            Err(TlsError::AmbiguousIdentity { .. })
        ));
    }

    #[test]
    fn no_identity_is_an_error() {
        assert!(matches!(
            identity_with(&der("", None, &[]), &both()),
            Err(TlsError::NoIdentity)
        ));
        assert!(matches!(
            identity_from_cert(b"garbage"),
            Err(TlsError::BadCertificate { .. })
        ));
    }
}
