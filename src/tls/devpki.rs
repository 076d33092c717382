//! Development PKI: a local CA, a localhost server certificate and SPIFFE
//! client certificates, plus a general-purpose issuer for tests and tools.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, Ia5String, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, PrintableString, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::error::TlsError;

/// SPIFFE trust domain of the development client identities.
pub const TRUST_DOMAIN: &str = "example.org";

/// Common name of the development CA.
pub const DEV_CA_NAME: &str = "keyward dev CA";

/// Backdating of `not_before` to tolerate small clock skew.
const SKEW: Duration = Duration::minutes(5);

/// Files of a development PKI created by [`ensure_dev_pki`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// `<dir>/ca.pem`: the dev CA certificate (client and server trust root).
    pub ca_cert: PathBuf,
    /// `<dir>/ca-key.pem`: the dev CA private key (0600).
    pub ca_key: PathBuf,
    /// `<dir>/server.pem`: server certificate for localhost, 127.0.0.1, ::1.
    pub server_cert: PathBuf,
    /// `<dir>/server-key.pem`: server private key (0600).
    pub server_key: PathBuf,
    /// One entry per requested client name, in the order given.
    pub clients: Vec<ClientProfile>,
}

/// One development client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientProfile {
    /// The client name (also the certificate's CN).
    pub name: String,
    /// `spiffe://example.org/<name>`, the certificate's URI SAN.
    pub identity: String,
    /// `<dir>/clients/<name>.pem`
    pub cert: PathBuf,
    /// `<dir>/clients/<name>-key.pem` (0600)
    pub key: PathBuf,
}

/// What [`issue`] puts in a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    /// Subject CN; empty for a certificate with an empty subject.
    pub common_name: String,
    /// URI SANs (e.g. a SPIFFE ID); a client identity needs exactly one.
    pub uri_sans: Vec<String>,
    /// DNS names; entries that parse as an IP address become IP SANs.
    pub dns_sans: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Add the clientAuth extended key usage.
    pub client: bool,
    /// Add the serverAuth extended key usage.
    pub server: bool,
}

/// Create (first call) or reuse (later calls) a development PKI under `dir`:
/// `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem` and
/// `clients/<name>.pem` + `clients/<name>-key.pem` for each client name.
/// Existing files are never regenerated; missing client certificates are
/// issued by the existing CA. Private keys are written with mode 0600.
pub fn ensure_dev_pki(dir: &Path, client_names: &[&str]) -> Result<DevPki, TlsError> {
    let clients_dir = dir.join("clients");
    for name in client_names {
        validate_client_name(&clients_dir, name)?;
    }
    create_dir(dir)?;
    create_dir(&clients_dir)?;

    let ca_cert = dir.join("ca.pem");
    let ca_key = dir.join("ca-key.pem");
    let server_cert = dir.join("server.pem");
    let server_key = dir.join("server-key.pem");
    let clients: Vec<ClientProfile> = client_names
        .iter()
        .map(|name| ClientProfile {
            name: (*name).to_owned(),
            identity: format!("spiffe://{TRUST_DOMAIN}/{name}"),
            cert: clients_dir.join(format!("{name}.pem")),
            key: clients_dir.join(format!("{name}-key.pem")),
        })
        .collect();

    let (ca_cert_pem, ca_key_pem) = if pair_exists(&ca_cert, &ca_key)? {
        (read_string(&ca_cert)?, read_string(&ca_key)?)
    } else {
        // A new CA would not verify certificates already in the directory.
        let leaves = [&server_cert, &server_key]
            .into_iter()
            .chain(clients.iter().flat_map(|c| [&c.cert, &c.key]));
        for leaf in leaves {
            if leaf.exists() {
                return Err(TlsError::Invalid {
                    path: leaf.clone(),
                    reason: "dev CA is missing but certificates it issued exist; \
                             remove the directory to start over"
                        .to_owned(),
                });
            }
        }
        let (cert, key) = new_ca(DEV_CA_NAME)?;
        write_private(&ca_key, key.as_bytes())?;
        write_public(&ca_cert, cert.as_bytes())?;
        (cert, key)
    };

    let now = OffsetDateTime::now_utc();
    if !pair_exists(&server_cert, &server_key)? {
        let spec = CertSpec {
            common_name: "localhost".to_owned(),
            uri_sans: vec![],
            dns_sans: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            not_before: now - SKEW,
            not_after: now + Duration::days(365),
            client: false,
            server: true,
        };
        let (cert, key) = issue_at(&ca_cert_pem, &ca_key_pem, &ca_cert, &spec)?;
        write_private(&server_key, key.as_bytes())?;
        write_public(&server_cert, cert.as_bytes())?;
    }
    for client in &clients {
        if pair_exists(&client.cert, &client.key)? {
            continue;
        }
        let spec = CertSpec {
            common_name: client.name.clone(),
            uri_sans: vec![client.identity.clone()],
            dns_sans: Vec::new(),
            not_before: now - SKEW,
            not_after: now + Duration::days(365),
            client: true,
            server: false,
        };
        let (cert, key) = issue_at(&ca_cert_pem, &ca_key_pem, &ca_cert, &spec)?;
        write_private(&client.key, key.as_bytes())?;
        write_public(&client.cert, cert.as_bytes())?;
    }

    Ok(DevPki {
        ca_cert,
        ca_key,
        server_cert,
        server_key,
        clients,
    })
}

/// A new self-signed ECDSA P-256 CA valid for 10 years: `(cert_pem, key_pem)`.
pub fn new_ca(cn: &str) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - SKEW;
    params.not_after = now + Duration::days(3650);
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issue a leaf certificate with a fresh ECDSA P-256 key, signed by the CA
/// given as PEM. Returns `(cert_pem, key_pem)`.
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, spec: &CertSpec) -> Result<(String, String), TlsError> {
    issue_at(ca_cert_pem, ca_key_pem, Path::new("<ca certificate>"), spec)
}

/// Write `contents` to `path` with mode 0600: written to a fresh temporary
/// file created 0600 in the same directory, then renamed over `path`.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    write_atomic(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    write_atomic(path, contents, 0o644)
}

/// Issue a certificate revocation list (PEM) of the CA given as PEM, valid
/// for `valid_for`, revoking each certificate of `revoked` (PEM).
pub fn revocation_list(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    revoked: &[&str],
    valid_for: Duration,
) -> Result<String, TlsError> {
    let ca_path = Path::new("<ca certificate>");
    let (issuer, ca_key, key_identifier_method) = issuer_of(ca_cert_pem, ca_key_pem, ca_path)?;
    let now = OffsetDateTime::now_utc();
    let mut revoked_certs = Vec::with_capacity(revoked.len());
    for pem in revoked {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Invalid {
            path: PathBuf::from("<revoked certificate>"),
            reason: format!("PEM: {e}"),
        })?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| TlsError::Invalid {
            path: PathBuf::from("<revoked certificate>"),
            reason: e.to_string(),
        })?;
        revoked_certs.push(rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(cert.raw_serial()),
            revocation_time: now - SKEW,
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - SKEW,
        next_update: now + valid_for,
        crl_number: random_serial()?,
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method,
    };
    Ok(params.signed_by(&issuer, &ca_key)?.pem()?)
}

/// The CA given as PEM, rebuilt as an rcgen issuer: its subject name, key
/// identifier and key (what rcgen needs to sign for it).
fn issuer_of(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    ca_path: &Path,
) -> Result<(rcgen::Certificate, KeyPair, KeyIdMethod), TlsError> {
    let invalid = |reason: String| TlsError::Invalid {
        path: ca_path.to_path_buf(),
        reason,
    };
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| invalid(format!("CA key: {e}")))?;
    let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
        .map_err(|e| invalid(format!("CA certificate PEM: {e}")))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| invalid(format!("CA certificate: {e}")))?;
    if ca.public_key().raw != ca_key.public_key_der().as_slice() {
        return Err(invalid("CA key does not match CA certificate".to_owned()));
    }

    // rcgen only needs the issuer's subject name, key identifier and key to
    // sign; rebuild those from the CA certificate.
    let mut issuer_params = CertificateParams::default();
    issuer_params.distinguished_name = subject_of(&ca).map_err(invalid)?;
    let key_identifier_method = match subject_key_id(&ca) {
        Some(ski) => KeyIdMethod::PreSpecified(ski),
        None => KeyIdMethod::Sha256,
    };
    issuer_params.key_identifier_method = key_identifier_method.clone();
    issuer_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    issuer_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = issuer_params.self_signed(&ca_key)?;
    Ok((issuer, ca_key, key_identifier_method))
}

fn issue_at(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    ca_path: &Path,
    spec: &CertSpec,
) -> Result<(String, String), TlsError> {
    let (issuer, ca_key, _) = issuer_of(ca_cert_pem, ca_key_pem, ca_path)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if !spec.common_name.is_empty() {
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.as_str());
    }
    let bad_spec = |reason: String| TlsError::Invalid {
        path: PathBuf::from("<certificate spec>"),
        reason,
    };
    for uri in &spec.uri_sans {
        let uri = Ia5String::try_from(uri.as_str()).map_err(|e| bad_spec(format!("URI SAN {uri:?}: {e}")))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    for name in &spec.dns_sans {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                Ia5String::try_from(name.as_str()).map_err(|e| bad_spec(format!("DNS SAN {name:?}: {e}")))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if spec.server {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if spec.client {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The subject of `cert` as an rcgen name, preserving attribute order, types
/// and string encodings so issued certificates chain to it byte-for-byte.
fn subject_of(cert: &X509Certificate<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    let mut seen = Vec::new();
    for rdn in cert.subject().iter() {
        if rdn.iter().count() != 1 {
            return Err("CA subject has a multi-valued RDN (unsupported)".to_owned());
        }
        for attr in rdn.iter() {
            let oid: Vec<u64> = attr
                .attr_type()
                .iter()
                .ok_or_else(|| "CA subject has an oversized OID".to_owned())?
                .collect();
            if seen.contains(&oid) {
                return Err("CA subject repeats an attribute type (unsupported)".to_owned());
            }
            seen.push(oid.clone());
            let any = attr.attr_value();
            let text = attr
                .as_str()
                .map_err(|e| format!("CA subject attribute: {e}"))?
                .to_owned();
            let value = match any.tag() {
                Tag::Utf8String => DnValue::Utf8String(text),
                Tag::PrintableString => DnValue::PrintableString(
                    PrintableString::try_from(text).map_err(|e| format!("CA subject attribute: {e}"))?,
                ),
                Tag::Ia5String => {
                    DnValue::Ia5String(Ia5String::try_from(text).map_err(|e| format!("CA subject attribute: {e}"))?)
                }
                other => return Err(format!("CA subject uses unsupported string type {other}")),
            };
            dn.push(DnType::CustomDnType(oid), value);
        }
    }
    Ok(dn)
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions().find_map(|ext| match ext.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
        _ => None,
    })
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| TlsError::Invalid {
            path: PathBuf::from("<random>"),
            reason: "system random number generator failed".to_owned(),
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validate_client_name(clients_dir: &Path, name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::Invalid {
            path: clients_dir.to_path_buf(),
            reason: format!("invalid client name {name:?} (use [A-Za-z0-9._-], not starting with '.')"),
        })
    }
}

/// Whether both files of a cert/key pair exist; an error if only one does.
fn pair_exists(cert: &Path, key: &Path) -> Result<bool, TlsError> {
    match (cert.exists(), key.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(TlsError::NoPrivateKey {
            path: key.to_path_buf(),
        }),
        (false, true) => Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        }),
    }
}

fn read_string(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        write_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
    tmp_name.push(format!(".tmp-{}-{unique}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);

    // A leftover from an interrupted run would make `create_new` fail.
    let _ = std::fs::remove_file(&tmp);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = options
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    Ok(())
}
