//! JWS compact serialization (RFC 7515) for EdDSA (RFC 8037), ES256 and ES256K (RFC 8812),
//! with our own exact encoder: the private keys live in the HSM, so signing goes through a
//! caller-supplied closure.
//!
//! The verifier is strict on purpose: exactly three base64url parts without padding, a JSON
//! header without duplicate members naming one of the three algorithms (never `none`, HMAC or
//! RSA), no `crit`, a `kid` naming a key whose `kty`/`crv`/`alg` fit the header's `alg` (no alg
//! confusion), a 64-byte signature, low-s for ES256K, and Ed25519 `verify_strict`. The payload
//! is parsed only after the signature verified.
//!
//! ES256 signatures are checked by `jsonwebtoken`'s verifier; the rest is ours because
//! `jsonwebtoken` (10.x) cannot carry it: it has no ES256K (neither the algorithm nor the
//! secp256k1 JWK curve, so a JWKS holding one does not even parse), verifies Ed25519 with
//! `verify` (small-order R accepted), ignores `crit`, keeps the last of duplicate members,
//! reads `"typ": null` as absent, has no size limit, and signs only through a process-wide
//! provider fed with key bytes, where our keys are HSM handles. `src/fuzzing.rs` holds a
//! differential test against it that names each of these differences.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::jwk::{b64, Crv, Jwk, Kty};

/// Longest compact JWS accepted by the verifier.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;
/// Longest attacker-supplied string (alg, kid) echoed in an error.
const ECHO_MAX: usize = 64;

/// The JWS algorithms keyward signs and accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JwsAlg {
    /// Ed25519 (RFC 8037).
    EdDSA,
    /// ECDSA P-256 + SHA-256.
    ES256,
    /// ECDSA secp256k1 + SHA-256 (RFC 8812).
    ES256K,
}

impl JwsAlg {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            JwsAlg::EdDSA => "EdDSA",
            JwsAlg::ES256 => "ES256",
            JwsAlg::ES256K => "ES256K",
        }
    }

    /// The algorithm named `s`, if it is one of ours.
    pub fn parse(s: &str) -> Option<JwsAlg> {
        [JwsAlg::EdDSA, JwsAlg::ES256, JwsAlg::ES256K]
            .into_iter()
            .find(|a| a.as_str() == s)
    }

    /// (kty, crv) a key for this algorithm must have.
    pub fn key_type(self) -> (Kty, Crv) {
        match self {
            JwsAlg::EdDSA => (Kty::Okp, Crv::Ed25519),
            JwsAlg::ES256 => (Kty::Ec, Crv::P256),
            JwsAlg::ES256K => (Kty::Ec, Crv::Secp256k1),
        }
    }
}

impl fmt::Display for JwsAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A part of a compact JWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwsPart {
    /// The whole token (part count).
    Token,
    /// The protected header.
    Header,
    /// The payload.
    Payload,
    /// The signature.
    Signature,
}

impl fmt::Display for JwsPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JwsPart::Token => "token",
            JwsPart::Header => "header",
            JwsPart::Payload => "payload",
            JwsPart::Signature => "signature",
        })
    }
}

/// Why a JWS could not be produced or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwsError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token of {len} bytes exceeds {max}")]
    TooLarge {
        /// Token length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Structure or encoding is wrong.
    #[error("malformed JWS {part}: {reason}")]
    Malformed {
        /// Which part.
        part: JwsPart,
        /// What is wrong.
        reason: &'static str,
    },
    /// `alg` is not EdDSA, ES256 or ES256K (this includes `none`, HS*, RS*, PS*).
    #[error("unsupported JWS alg {alg:?}")]
    UnsupportedAlg {
        /// The header's alg (truncated).
        alg: String,
    },
    /// The header carries `crit`: no extension is understood.
    #[error("JWS header has crit: extensions are not supported")]
    CritUnsupported,
    /// The header has no `kid`.
    #[error("JWS header has no kid")]
    MissingKid,
    /// No key has this kid.
    #[error("no key with kid {kid:?}")]
    UnknownKid {
        /// The header's kid (truncated).
        kid: String,
    },
    /// The key named by kid is not a key for the header's alg (kty, crv, alg or use differ).
    #[error("key {kid:?} is not a {alg} signing key")]
    KeyAlgMismatch {
        /// The kid.
        kid: String,
        /// The header's alg.
        alg: JwsAlg,
    },
    /// The JWK's public key material is unusable.
    #[error("key {kid:?} is invalid: {reason}")]
    BadKey {
        /// The kid.
        kid: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The signature is not exactly 64 bytes.
    #[error("signature of {len} bytes (expected 64)")]
    SignatureLength {
        /// Decoded length.
        len: usize,
    },
    /// ES256K signature with a high s (not normalised; refused as malleable).
    #[error("ES256K signature has a high s")]
    HighS,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// The signer returned something that is not a signature for this algorithm.
    #[error("signer output refused: {reason}")]
    SignerOutput {
        /// What is wrong.
        reason: &'static str,
    },
    /// The header or claims could not be encoded.
    #[error("cannot encode JWS: {reason}")]
    Encode {
        /// What is wrong.
        reason: &'static str,
    },
}

/// The protected header as verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Algorithm.
    pub alg: JwsAlg,
    /// Key id (always present after [`verify_compact`]).
    pub kid: Option<String>,
    /// Media type, e.g. `keyward-session+jwt`.
    pub typ: Option<String>,
}

/// A verified token: its header and its claims (a JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// Protected header.
    pub header: Header,
    /// Claims (the payload as a JSON object).
    pub claims: serde_json::Value,
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'a str,
}

fn echo(s: &str) -> String {
    s.chars().take(ECHO_MAX).collect()
}

/// Sign `claims` (a JSON object) as a compact JWS with header `{"alg","kid","typ"}`.
///
/// `sign` receives, for EdDSA, the JWS signing input (`header.payload`); for ES256/ES256K its
/// 32-byte SHA-256 digest (what an HSM's `CKM_ECDSA` signs). It returns 64 bytes (`r‖s` for
/// ECDSA, in either s form: the result is normalised to low-s). Errors of `sign` pass through.
pub fn sign_compact<E: From<JwsError>>(
    alg: JwsAlg,
    kid: &str,
    typ: &str,
    claims: &serde_json::Value,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    if !claims.is_object() {
        return Err(JwsError::Encode {
            reason: "claims must be a JSON object",
        }
        .into());
    }
    let header = serde_json::to_vec(&HeaderOut {
        alg: alg.as_str(),
        kid,
        typ,
    })
    .map_err(|_| JwsError::Encode { reason: "header" })?;
    let payload = serde_json::to_vec(claims).map_err(|_| JwsError::Encode { reason: "claims" })?;
    sign_raw(alg, &header, &payload, sign)
}

/// Low-level signer over exact header and payload bytes (for test vectors and callers that
/// need byte-exact control). The header must be a JSON object whose `alg` is `alg`.
pub fn sign_raw<E: From<JwsError>>(
    alg: JwsAlg,
    header_json: &[u8],
    payload: &[u8],
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let parsed = parse_header(header_json)?;
    if parsed.alg != alg {
        return Err(JwsError::Encode {
            reason: "header alg differs from the signing alg",
        }
        .into());
    }
    let mut out = b64(header_json);
    out.push('.');
    out.push_str(&b64(payload));
    let sig = match alg {
        JwsAlg::EdDSA => {
            let sig = sign(out.as_bytes())?;
            if sig.len() != 64 {
                return Err(JwsError::SignerOutput {
                    reason: "Ed25519 signature is not 64 bytes",
                }
                .into());
            }
            sig
        }
        JwsAlg::ES256 | JwsAlg::ES256K => {
            let digest: [u8; 32] = Sha256::digest(out.as_bytes()).into();
            let raw = sign(&digest)?;
            low_s(alg, &raw)?.to_vec()
        }
    };
    out.push('.');
    out.push_str(&b64(&sig));
    Ok(out)
}

/// Normalise a raw ECDSA `r‖s` to low-s.
fn low_s(alg: JwsAlg, raw: &[u8]) -> Result<[u8; 64], JwsError> {
    let bad = JwsError::SignerOutput {
        reason: "not a 64-byte ECDSA r||s with 0 < r, s < n",
    };
    let mut out = [0u8; 64];
    match alg {
        JwsAlg::ES256 => {
            let sig = p256::ecdsa::Signature::from_slice(raw).map_err(|_| bad)?;
            out.copy_from_slice(&sig.normalize_s().unwrap_or(sig).to_bytes());
        }
        JwsAlg::ES256K => {
            let sig = k256::ecdsa::Signature::from_slice(raw).map_err(|_| bad)?;
            out.copy_from_slice(&sig.normalize_s().unwrap_or(sig).to_bytes());
        }
        JwsAlg::EdDSA => return Err(bad),
    }
    Ok(out)
}

/// A JSON object that refuses duplicate members.
struct UniqueObject(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueObject, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v = map.next_value::<serde_json::Value>()?;
                    if out.insert(k, v).is_some() {
                        return Err(serde::de::Error::custom("duplicate member"));
                    }
                }
                Ok(UniqueObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_object(part: JwsPart, bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, JwsError> {
    match serde_json::from_slice::<UniqueObject>(bytes) {
        Ok(o) => Ok(o.0),
        Err(e) if e.to_string().contains("duplicate member") => Err(JwsError::Malformed {
            part,
            reason: "duplicate JSON member",
        }),
        Err(_) => Err(JwsError::Malformed {
            part,
            reason: "not a JSON object",
        }),
    }
}

fn opt_string(h: &serde_json::Map<String, serde_json::Value>, name: &str) -> Result<Option<String>, JwsError> {
    match h.get(name) {
        None => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(JwsError::Malformed {
            part: JwsPart::Header,
            reason: "alg, kid and typ must be strings",
        }),
    }
}

fn parse_header(bytes: &[u8]) -> Result<Header, JwsError> {
    let h = parse_object(JwsPart::Header, bytes)?;
    let alg = opt_string(&h, "alg")?.ok_or(JwsError::Malformed {
        part: JwsPart::Header,
        reason: "no alg",
    })?;
    let alg = JwsAlg::parse(&alg).ok_or_else(|| JwsError::UnsupportedAlg { alg: echo(&alg) })?;
    if h.contains_key("crit") {
        return Err(JwsError::CritUnsupported);
    }
    Ok(Header {
        alg,
        kid: opt_string(&h, "kid")?,
        typ: opt_string(&h, "typ")?,
    })
}

fn decode(part: JwsPart, s: &str) -> Result<Vec<u8>, JwsError> {
    URL_SAFE_NO_PAD.decode(s).map_err(|_| JwsError::Malformed {
        part,
        reason: "not base64url without padding",
    })
}

/// A split, decoded token whose header passed the checks; the payload is not parsed yet.
struct Parsed<'a> {
    header: Header,
    signing_input: &'a [u8],
    payload_b64: &'a str,
    signature: Vec<u8>,
}

fn parse(token: &str) -> Result<Parsed<'_>, JwsError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwsError::TooLarge {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwsError::Malformed {
            part: JwsPart::Token,
            reason: "expected exactly 3 dot-separated parts",
        });
    };
    let header = parse_header(&decode(JwsPart::Header, h)?)?;
    // Decode the payload now so that a bad encoding is reported as such, not as a bad signature.
    decode(JwsPart::Payload, p)?;
    let signature = decode(JwsPart::Signature, s)?;
    if signature.len() != 64 {
        return Err(JwsError::SignatureLength { len: signature.len() });
    }
    Ok(Parsed {
        header,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        payload_b64: p,
        signature,
    })
}

/// Does `key` serve `alg`?
fn fits(key: &Jwk, alg: JwsAlg) -> bool {
    let (kty, crv) = alg.key_type();
    key.alg == alg && key.kty == kty && key.crv == crv && key.use_ == "sig" && (kty == Kty::Okp) == key.y.is_none()
}

fn coord(key: &Jwk, s: &str) -> Result<[u8; 32], JwsError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| JwsError::BadKey {
            kid: echo(&key.kid),
            reason: "coordinate is not 32 bytes of base64url",
        })
}

fn sec1(key: &Jwk) -> Result<Vec<u8>, JwsError> {
    let y = key.y.as_deref().ok_or_else(|| JwsError::BadKey {
        kid: echo(&key.kid),
        reason: "EC key without y",
    })?;
    let mut out = Vec::with_capacity(65);
    out.push(4u8);
    out.extend_from_slice(&coord(key, &key.x)?);
    out.extend_from_slice(&coord(key, y)?);
    Ok(out)
}

fn check_signature(p: &Parsed<'_>, key: &Jwk) -> Result<(), JwsError> {
    let not_a_point = || JwsError::BadKey {
        kid: echo(&key.kid),
        reason: "not a valid public key",
    };
    match p.header.alg {
        JwsAlg::EdDSA => {
            let vk = ed25519_dalek::VerifyingKey::from_bytes(&coord(key, &key.x)?).map_err(|_| not_a_point())?;
            let sig = ed25519_dalek::Signature::from_slice(&p.signature).map_err(|_| JwsError::BadSignature)?;
            vk.verify_strict(p.signing_input, &sig)
                .map_err(|_| JwsError::BadSignature)
        }
        JwsAlg::ES256 => {
            // jsonwebtoken's RustCrypto ES256 verifier: P-256 over SHA-256 of the signing
            // input, either s form (RFC 7515 has no low-s rule). Taken from its provider
            // directly rather than the process-wide default, so no global state is involved.
            // The uncompressed SEC1 point, as `DecodingKey::from_ec_components` builds it.
            let point = jsonwebtoken::DecodingKey::from_ec_der(&sec1(key)?);
            let verifier = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.verifier_factory)(
                &jsonwebtoken::Algorithm::ES256,
                &point,
            )
            .map_err(|_| not_a_point())?;
            verifier
                .verify(p.signing_input, &p.signature)
                .map_err(|_| JwsError::BadSignature)
        }
        JwsAlg::ES256K => {
            use k256::ecdsa::signature::hazmat::PrehashVerifier;
            let vk = k256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1(key)?).map_err(|_| not_a_point())?;
            let sig = k256::ecdsa::Signature::from_slice(&p.signature).map_err(|_| JwsError::BadSignature)?;
            if sig.normalize_s().is_some() {
                return Err(JwsError::HighS);
            }
            let digest = Sha256::digest(p.signing_input);
            vk.verify_prehash(&digest, &sig).map_err(|_| JwsError::BadSignature)
        }
    }
}

/// Verify a compact JWS against `keys` (strict; see the module docs) and return its header and
/// claims (which must be a JSON object without duplicate members).
pub fn verify_compact(token: &str, keys: &[Jwk]) -> Result<Verified, JwsError> {
    let p = parse(token)?;
    let kid = p.header.kid.as_deref().ok_or(JwsError::MissingKid)?;
    let mut named = keys.iter().filter(|k| k.kid == kid).peekable();
    if named.peek().is_none() {
        return Err(JwsError::UnknownKid { kid: echo(kid) });
    }
    let key = named
        .find(|k| fits(k, p.header.alg))
        .ok_or_else(|| JwsError::KeyAlgMismatch {
            kid: echo(kid),
            alg: p.header.alg,
        })?;
    check_signature(&p, key)?;
    let claims = parse_object(JwsPart::Payload, &decode(JwsPart::Payload, p.payload_b64)?)?;
    Ok(Verified {
        header: p.header,
        claims: serde_json::Value::Object(claims),
    })
}

/// Verify a compact JWS against one given key, without the kid requirement, and return the
/// header and the raw payload bytes (any content). For test vectors and detached checks; the
/// other rules of [`verify_compact`] apply (the key must fit the header's alg).
pub fn verify_with_key(token: &str, key: &Jwk) -> Result<(Header, Vec<u8>), JwsError> {
    let p = parse(token)?;
    if !fits(key, p.header.alg) {
        return Err(JwsError::KeyAlgMismatch {
            kid: echo(&key.kid),
            alg: p.header.alg,
        });
    }
    check_signature(&p, key)?;
    let payload = decode(JwsPart::Payload, p.payload_b64)?;
    Ok((p.header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;
    use serde_json::json;

    type R = Result<(), Box<dyn std::error::Error>>;

    fn vector(name: &str) -> serde_json::Value {
        let path = format!("{}/tests/data/jose/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn s<'a>(v: &'a serde_json::Value, ptr: &str) -> &'a str {
        v.pointer(ptr)
            .and_then(|x| x.as_str())
            .unwrap_or_else(|| panic!("{ptr}"))
    }

    fn unb64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// A software key of each algorithm, with a signer that behaves like an HSM (ECDSA: raw
    /// r‖s over the digest, deliberately high-s when `high` is set).
    enum Soft {
        Ed(ed25519_dalek::SigningKey),
        P256(p256::ecdsa::SigningKey),
        K256(k256::ecdsa::SigningKey),
    }

    impl Soft {
        fn new(alg: JwsAlg, seed: u8) -> Soft {
            let b = [seed; 32];
            match alg {
                JwsAlg::EdDSA => Soft::Ed(ed25519_dalek::SigningKey::from_bytes(&b)),
                JwsAlg::ES256 => Soft::P256(p256::ecdsa::SigningKey::from_slice(&b).expect("key")),
                JwsAlg::ES256K => Soft::K256(k256::ecdsa::SigningKey::from_slice(&b).expect("key")),
            }
        }

        fn alg(&self) -> JwsAlg {
            match self {
                Soft::Ed(_) => JwsAlg::EdDSA,
                Soft::P256(_) => JwsAlg::ES256,
                Soft::K256(_) => JwsAlg::ES256K,
            }
        }

        fn jwk(&self) -> Jwk {
            match self {
                Soft::Ed(k) => Jwk::ed25519(k.verifying_key().as_bytes()),
                Soft::P256(k) => Jwk::ec_p256(k.verifying_key().to_encoded_point(false).as_bytes()),
                Soft::K256(k) => Jwk::ec_secp256k1(k.verifying_key().to_encoded_point(false).as_bytes()),
            }
            .expect("jwk")
        }

        fn sign(&self, data: &[u8], high: bool) -> Result<Vec<u8>, JwsError> {
            Ok(match self {
                Soft::Ed(k) => k.sign(data).to_bytes().to_vec(),
                Soft::P256(k) => crate::fuzzing::p256_rs(k, data, high),
                Soft::K256(k) => crate::fuzzing::k256_rs(k, data, high),
            })
        }

        fn token(&self, claims: &serde_json::Value, high: bool) -> String {
            let kid = self.jwk().kid;
            sign_compact(self.alg(), &kid, "test+jwt", claims, |d| self.sign(d, high)).expect("signs")
        }
    }

    const ALGS: [JwsAlg; 3] = [JwsAlg::EdDSA, JwsAlg::ES256, JwsAlg::ES256K];

    fn claims() -> serde_json::Value {
        json!({"sub": "acct-1", "exp": 4102444800u64, "scopes": ["payments:0-100"], "n": 1.5})
    }

    /// header.payload.signature from raw JSON strings and signature bytes.
    fn forge(header: &str, payload: &str, sig: &[u8]) -> String {
        format!("{}.{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()), b64(sig))
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_string).collect()
    }

    #[test]
    fn rfc7515_a3_es256_verifies() -> R {
        let v = vector("rfc7515_a3_es256.json");
        let mut sec1 = vec![4u8];
        sec1.extend(unb64(s(&v, "/public_jwk/x")));
        sec1.extend(unb64(s(&v, "/public_jwk/y")));
        let key = Jwk::ec_p256(&sec1)?;
        let token = s(&v, "/compact_jws");
        let (header, payload) = verify_with_key(token, &key)?;
        assert_eq!(header.alg, JwsAlg::ES256);
        assert_eq!(header.kid, None);
        assert_eq!(payload, unb64(parts(token)[1].as_str()));
        // The vector's s is high: ES256 verification accepts either form (RFC 7515 has no rule).
        // verify_compact insists on a kid.
        assert_eq!(
            verify_compact(token, std::slice::from_ref(&key)),
            Err(JwsError::MissingKid)
        );
        // One flipped payload bit fails.
        let p = parts(token);
        let mut payload = unb64(&p[1]);
        payload[3] ^= 1;
        let bad = format!("{}.{}.{}", p[0], b64(&payload), p[2]);
        assert_eq!(verify_with_key(&bad, &key), Err(JwsError::BadSignature));
        Ok(())
    }

    #[test]
    fn rfc8037_a4_sign_exact_and_a5_verify() -> R {
        let v = vector("rfc8037_ed25519.json");
        let d: [u8; 32] = unb64(s(&v, "/A1_private_jwk/d")).as_slice().try_into()?;
        let sk = ed25519_dalek::SigningKey::from_bytes(&d);
        let key = Jwk::ed25519(&unb64(s(&v, "/A2_public_jwk/x")))?;
        assert_eq!(key.x, b64(sk.verifying_key().as_bytes()));
        let token = sign_raw(
            JwsAlg::EdDSA,
            br#"{"alg":"EdDSA"}"#,
            s(&v, "/A4_signing/payload_text").as_bytes(),
            |input| {
                assert_eq!(input, s(&v, "/A4_signing/signing_input").as_bytes());
                Ok::<_, JwsError>(sk.sign(input).to_bytes().to_vec())
            },
        )?;
        assert_eq!(token, s(&v, "/A4_signing/compact_jws"));
        let (header, payload) = verify_with_key(s(&v, "/A4_signing/compact_jws"), &key)?;
        assert_eq!(header.alg, JwsAlg::EdDSA);
        assert_eq!(payload, s(&v, "/A4_signing/payload_text").as_bytes());
        Ok(())
    }

    #[test]
    fn round_trip_all_algs_with_high_s_normalised() -> R {
        for alg in ALGS {
            let key = Soft::new(alg, 7);
            for high in [false, true] {
                let token = key.token(&claims(), high);
                let v = verify_compact(&token, &[Soft::new(alg, 8).jwk().with_kid("x"), key.jwk()])?;
                assert_eq!(v.claims, claims());
                assert_eq!(v.header.alg, alg);
                assert_eq!(v.header.kid.as_deref(), Some(key.jwk().kid.as_str()));
                assert_eq!(v.header.typ.as_deref(), Some("test+jwt"));
                let header: serde_json::Value = serde_json::from_slice(&unb64(&parts(&token)[0]))?;
                assert_eq!(
                    String::from_utf8(unb64(&parts(&token)[0]))?,
                    format!(r#"{{"alg":"{alg}","kid":"{}","typ":"test+jwt"}}"#, key.jwk().kid)
                );
                assert_eq!(header["alg"], alg.as_str());
                if alg != JwsAlg::EdDSA {
                    // Signature bytes are low-s.
                    let sig = unb64(&parts(&token)[2]);
                    let low = match alg {
                        JwsAlg::ES256 => p256::ecdsa::Signature::from_slice(&sig)?.normalize_s().is_none(),
                        _ => k256::ecdsa::Signature::from_slice(&sig)?.normalize_s().is_none(),
                    };
                    assert!(low, "{alg} signature not low-s");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn tampering_is_refused() {
        for alg in ALGS {
            let key = Soft::new(alg, 9);
            let jwk = key.jwk();
            let token = key.token(&claims(), false);
            let p = parts(&token);
            // Payload changed.
            let other = b64(br#"{"sub":"acct-2"}"#);
            let t = format!("{}.{other}.{}", p[0], p[2]);
            assert_eq!(
                verify_compact(&t, std::slice::from_ref(&jwk)),
                Err(JwsError::BadSignature),
                "{alg}"
            );
            // Header changed (typ), same kid and alg.
            let h = b64(format!(r#"{{"alg":"{alg}","kid":"{}","typ":"other"}}"#, jwk.kid).as_bytes());
            let t = format!("{h}.{}.{}", p[1], p[2]);
            assert_eq!(
                verify_compact(&t, std::slice::from_ref(&jwk)),
                Err(JwsError::BadSignature),
                "{alg}"
            );
            // Signature bit flipped.
            let mut sig = unb64(&p[2]);
            sig[40] ^= 1;
            let t = format!("{}.{}.{}", p[0], p[1], b64(&sig));
            assert!(
                matches!(
                    verify_compact(&t, std::slice::from_ref(&jwk)),
                    Err(JwsError::BadSignature | JwsError::HighS)
                ),
                "{alg}"
            );
            // Signed by another key under this kid.
            let t = Soft::new(alg, 10).token(&claims(), false);
            let mut q = parts(&t);
            q[0] = p[0].clone();
            let forged = q.join(".");
            assert_eq!(
                verify_compact(&forged, std::slice::from_ref(&jwk)),
                Err(JwsError::BadSignature),
                "{alg}"
            );
        }
    }

    #[test]
    fn wrong_and_missing_kid() {
        let key = Soft::new(JwsAlg::EdDSA, 1);
        let token = key.token(&claims(), false);
        let other = Soft::new(JwsAlg::EdDSA, 2).jwk();
        assert!(matches!(
            verify_compact(&token, &[other]),
            Err(JwsError::UnknownKid { .. })
        ));
        assert!(matches!(verify_compact(&token, &[]), Err(JwsError::UnknownKid { .. })));
        let p = parts(&token);
        let t = format!("{}.{}.{}", b64(br#"{"alg":"EdDSA"}"#), p[1], p[2]);
        assert_eq!(verify_compact(&t, &[key.jwk()]), Err(JwsError::MissingKid));
    }

    #[test]
    fn none_hmac_rsa_and_unknown_algs_are_refused() {
        let key = Soft::new(JwsAlg::ES256, 3);
        let jwk = key.jwk();
        let payload = r#"{"sub":"acct-1"}"#;
        for alg in [
            "none", "HS256", "HS512", "RS256", "PS256", "ES384", "Ed25519", "eddsa", "",
        ] {
            let h = format!(r#"{{"alg":"{alg}","kid":"{}"}}"#, jwk.kid);
            for sig in [&[][..], &[0u8; 64][..]] {
                let t = forge(&h, payload, sig);
                assert_eq!(
                    verify_compact(&t, std::slice::from_ref(&jwk)),
                    Err(JwsError::UnsupportedAlg { alg: alg.to_string() }),
                    "{alg}"
                );
            }
        }
        // alg "none" with an empty signature part ("a.b.").
        let t = format!(
            "{}.{}.",
            b64(format!(r#"{{"alg":"none","kid":"{}"}}"#, jwk.kid).as_bytes()),
            b64(payload.as_bytes())
        );
        assert!(matches!(
            verify_compact(&t, std::slice::from_ref(&jwk)),
            Err(JwsError::UnsupportedAlg { .. })
        ));
        // alg not a string, or missing.
        let t = forge(&format!(r#"{{"alg":1,"kid":"{}"}}"#, jwk.kid), payload, &[0; 64]);
        assert!(matches!(
            verify_compact(&t, std::slice::from_ref(&jwk)),
            Err(JwsError::Malformed {
                part: JwsPart::Header,
                ..
            })
        ));
        let t = forge(&format!(r#"{{"kid":"{}"}}"#, jwk.kid), payload, &[0; 64]);
        assert!(matches!(
            verify_compact(&t, &[jwk]),
            Err(JwsError::Malformed {
                part: JwsPart::Header,
                ..
            })
        ));
    }

    /// RFC 7519-style HS256 key confusion: HMAC with the public key (its JWK JSON or SEC1 bytes)
    /// as the secret must never verify.
    #[test]
    fn hs256_with_the_public_key_as_secret_is_refused() {
        fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
            let mut k = [0u8; 64];
            if key.len() > 64 {
                k[..32].copy_from_slice(&Sha256::digest(key));
            } else {
                k[..key.len()].copy_from_slice(key);
            }
            let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
            let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
            let inner = Sha256::new().chain_update(&ipad).chain_update(msg).finalize();
            Sha256::new()
                .chain_update(&opad)
                .chain_update(inner)
                .finalize()
                .to_vec()
        }
        for alg in ALGS {
            let jwk = Soft::new(alg, 4).jwk();
            let secrets = [
                serde_json::to_vec(&jwk).expect("json"),
                URL_SAFE_NO_PAD.decode(&jwk.x).expect("x"),
            ];
            for secret in secrets {
                let h = b64(format!(r#"{{"alg":"HS256","kid":"{}","typ":"JWT"}}"#, jwk.kid).as_bytes());
                let p = b64(br#"{"sub":"admin"}"#);
                let input = format!("{h}.{p}");
                let mut mac = hmac_sha256(&secret, input.as_bytes());
                mac.extend_from_slice(&[0u8; 32]); // even padded to 64 bytes
                for sig in [&mac[..32], &mac[..]] {
                    let t = format!("{input}.{}", b64(sig));
                    assert_eq!(
                        verify_compact(&t, std::slice::from_ref(&jwk)),
                        Err(JwsError::UnsupportedAlg { alg: "HS256".into() })
                    );
                }
            }
        }
    }

    #[test]
    fn alg_confusion_between_keys_of_the_same_kid_is_refused() {
        // An ES256 token presented with an ES256K key carrying the same kid.
        let es256 = Soft::new(JwsAlg::ES256, 5);
        let token = es256.token(&claims(), false);
        let kid = es256.jwk().kid;
        let k1 = Soft::new(JwsAlg::ES256K, 5).jwk().with_kid(kid.clone());
        assert_eq!(
            verify_compact(&token, std::slice::from_ref(&k1)),
            Err(JwsError::KeyAlgMismatch {
                kid: kid.clone(),
                alg: JwsAlg::ES256
            })
        );
        // Same curve bytes but the key claims another alg / kty / use.
        let mut wrong_alg = es256.jwk();
        wrong_alg.alg = JwsAlg::ES256K;
        let mut wrong_use = es256.jwk();
        wrong_use.use_ = "enc".into();
        for k in [wrong_alg, wrong_use] {
            assert!(matches!(
                verify_compact(&token, &[k]),
                Err(JwsError::KeyAlgMismatch { .. })
            ));
        }
        // The right key among same-kid candidates is still found.
        assert!(verify_compact(&token, &[k1, es256.jwk()]).is_ok());
        // An EdDSA token against an EC key with its kid.
        let ed = Soft::new(JwsAlg::EdDSA, 5);
        let t = ed.token(&claims(), false);
        let ec = Soft::new(JwsAlg::ES256, 6).jwk().with_kid(ed.jwk().kid);
        assert!(matches!(
            verify_compact(&t, &[ec]),
            Err(JwsError::KeyAlgMismatch { .. })
        ));
        assert!(matches!(
            verify_with_key(&t, &es256.jwk()),
            Err(JwsError::KeyAlgMismatch { .. })
        ));
    }

    #[test]
    fn es256k_high_s_is_refused() {
        let key = Soft::new(JwsAlg::ES256K, 11);
        let token = key.token(&claims(), false);
        let p = parts(&token);
        let sig = k256::ecdsa::Signature::from_slice(&unb64(&p[2])).expect("sig");
        let high = k256::ecdsa::Signature::from_scalars(sig.r(), -*sig.s()).expect("high");
        let t = format!("{}.{}.{}", p[0], p[1], b64(&high.to_bytes()));
        assert_eq!(verify_compact(&t, &[key.jwk()]), Err(JwsError::HighS));
    }

    #[test]
    fn encoding_and_structure_are_strict() {
        let key = Soft::new(JwsAlg::EdDSA, 12);
        let jwk = key.jwk();
        let token = key.token(&claims(), false);
        assert!(verify_compact(&token, std::slice::from_ref(&jwk)).is_ok());
        let p = parts(&token);
        let malformed = |t: &str| match verify_compact(t, std::slice::from_ref(&jwk)) {
            Err(JwsError::Malformed { part, .. }) => Some(part),
            other => panic!("{t}: {other:?}"),
        };
        // 2 or 4 parts, and an empty token.
        assert_eq!(malformed(&format!("{}.{}", p[0], p[1])), Some(JwsPart::Token));
        assert_eq!(malformed(&format!("{token}.{}", p[2])), Some(JwsPart::Token));
        assert_eq!(malformed(&format!("{token}.")), Some(JwsPart::Token));
        assert_eq!(malformed(""), Some(JwsPart::Token));
        // Padding on any part (the signature's 86 chars pad to 88).
        assert_eq!(malformed(&format!("{token}==")), Some(JwsPart::Signature));
        assert_eq!(
            malformed(&format!("{}=.{}.{}", p[0], p[1], p[2])),
            Some(JwsPart::Header)
        );
        assert_eq!(
            malformed(&format!("{}==.{}.{}", p[0], p[1], p[2])),
            Some(JwsPart::Header)
        );
        assert_eq!(
            malformed(&format!("{}.{}=.{}", p[0], p[1], p[2])),
            Some(JwsPart::Payload)
        );
        // Standard-alphabet base64 and whitespace.
        let std_sig = p[2].replace('-', "+").replace('_', "/");
        if std_sig != p[2] {
            assert_eq!(
                malformed(&format!("{}.{}.{std_sig}", p[0], p[1])),
                Some(JwsPart::Signature)
            );
        }
        assert_eq!(malformed(&format!(" {token}")), Some(JwsPart::Header));
        // Header not JSON / not an object / duplicate alg.
        assert_eq!(malformed(&forge("not json", "{}", &[0; 64])), Some(JwsPart::Header));
        assert_eq!(malformed(&forge(r#"["EdDSA"]"#, "{}", &[0; 64])), Some(JwsPart::Header));
        let dup = format!(r#"{{"alg":"EdDSA","kid":"{}","alg":"none"}}"#, jwk.kid);
        assert_eq!(malformed(&forge(&dup, "{}", &[0; 64])), Some(JwsPart::Header));
        // Signature length.
        for len in [0usize, 63, 65, 128] {
            let t = format!("{}.{}.{}", p[0], p[1], b64(&vec![1u8; len]));
            assert_eq!(
                verify_compact(&t, std::slice::from_ref(&jwk)),
                Err(JwsError::SignatureLength { len })
            );
        }
        // crit.
        let h = format!(r#"{{"alg":"EdDSA","kid":"{}","crit":["exp"],"exp":1}}"#, jwk.kid);
        assert_eq!(
            verify_compact(&forge(&h, "{}", &[0; 64]), std::slice::from_ref(&jwk)),
            Err(JwsError::CritUnsupported)
        );
        // Too large.
        let big = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            verify_compact(&big, std::slice::from_ref(&jwk)),
            Err(JwsError::TooLarge { .. })
        ));
        // A validly signed payload that is not a JSON object (or has duplicates) is refused by
        // verify_compact (claims), but verify_with_key returns the bytes.
        for payload in [&b"plain text"[..], br#"[1]"#, br#"{"a":1,"a":2}"#] {
            let h = format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, jwk.kid);
            let t = sign_raw(JwsAlg::EdDSA, h.as_bytes(), payload, |d| key.sign(d, false)).expect("signs");
            assert!(matches!(
                verify_compact(&t, std::slice::from_ref(&jwk)),
                Err(JwsError::Malformed {
                    part: JwsPart::Payload,
                    ..
                })
            ));
            assert_eq!(verify_with_key(&t, &jwk).map(|(_, b)| b), Ok(payload.to_vec()));
        }
    }

    #[test]
    fn signer_errors_and_bad_output() {
        let k = Soft::new(JwsAlg::ES256, 13);
        let r = sign_compact(JwsAlg::ES256, "k", "t", &claims(), |_| Ok::<_, JwsError>(vec![0u8; 64]));
        assert!(matches!(r, Err(JwsError::SignerOutput { .. })));
        let r = sign_compact(JwsAlg::EdDSA, "k", "t", &claims(), |_| Ok::<_, JwsError>(vec![0u8; 63]));
        assert!(matches!(r, Err(JwsError::SignerOutput { .. })));
        let r = sign_compact(JwsAlg::ES256K, "k", "t", &claims(), |_| Err(JwsError::BadSignature));
        assert_eq!(r, Err(JwsError::BadSignature));
        let r = sign_compact(JwsAlg::ES256, "k", "t", &json!([1]), |d| k.sign(d, false));
        assert!(matches!(r, Err(JwsError::Encode { .. })));
        // The digest handed to an ECDSA signer is SHA-256 of the signing input.
        let mut seen = Vec::new();
        let t = sign_compact(JwsAlg::ES256, "k", "t", &claims(), |d| {
            seen = d.to_vec();
            k.sign(d, false)
        })
        .expect("signs");
        let input = t.rsplit_once('.').map(|(a, _)| a).unwrap_or_default();
        assert_eq!(seen, Sha256::digest(input.as_bytes()).to_vec());
        // sign_raw refuses a header whose alg differs.
        let r = sign_raw(JwsAlg::ES256, br#"{"alg":"ES256K"}"#, b"{}", |d| k.sign(d, false));
        assert!(matches!(r, Err(JwsError::Encode { .. })));
    }
}
