//! Derive a caller identity from a verified client certificate.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::error::TlsError;

/// The identity a certificate speaks for: its first URI SAN, else its first
/// DNS SAN, else its subject common name.
pub fn identity_from_cert(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate { reason: e.to_string() })?;
    let san = cert.subject_alternative_name().map_err(|e| TlsError::BadCertificate {
        reason: format!("subjectAltName: {e}"),
    })?;
    if let Some(san) = san {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) if !u.is_empty() => Some(*u),
            _ => None,
        });
        if let Some(uri) = uri {
            return Ok(uri.to_owned());
        }
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) if !d.is_empty() => Some(*d),
            _ => None,
        });
        if let Some(dns) = dns {
            return Ok(dns.to_owned());
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .map(|cn| {
            cn.as_str().map_err(|e| TlsError::BadCertificate {
                reason: format!("subject CN: {e}"),
            })
        })
        .transpose()?;
    match cn {
        Some(cn) if !cn.is_empty() => Ok(cn.to_owned()),
        _ => Err(TlsError::NoIdentity),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::devpki::{issue, new_ca, CertSpec};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    use time::{Duration, OffsetDateTime};

    fn der(cn: &str, uri: Option<&str>, dns: &[&str]) -> Vec<u8> {
        let (ca_cert, ca_key) = new_ca("test CA").unwrap();
        let now = OffsetDateTime::now_utc();
        let spec = CertSpec {
            common_name: cn.to_owned(),
            uri_san: uri.map(str::to_owned),
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

    #[test]
    fn uri_san_wins() {
        let d = der("cn", Some("spiffe://example.org/a"), &["a.example.org"]);
        assert_eq!(identity_from_cert(&d).unwrap(), "spiffe://example.org/a");
    }

    #[test]
    fn first_dns_san_beats_cn() {
        let d = der("cn", None, &["127.0.0.1", "a.example.org", "b.example.org"]);
        assert_eq!(identity_from_cert(&d).unwrap(), "a.example.org");
    }

    #[test]
    fn cn_is_last_resort() {
        assert_eq!(identity_from_cert(&der("svc", None, &[])).unwrap(), "svc");
        assert_eq!(identity_from_cert(&der("svc", None, &["10.0.0.1"])).unwrap(), "svc");
    }

    #[test]
    fn no_identity_is_an_error() {
        assert!(matches!(
            identity_from_cert(&der("", None, &[])),
            Err(TlsError::NoIdentity)
        ));
        assert!(matches!(
            identity_from_cert(b"garbage"),
            Err(TlsError::BadCertificate { .. })
        ));
    }
}
