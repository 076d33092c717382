//! Public JSON Web Keys (RFC 7517) for the issuer keys, their RFC 7638 thumbprints, and the
//! JWKS document verifiers fetch. Only public members exist here: no `d`, ever.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::jws::JwsAlg;

/// JWK key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kty {
    /// Octet key pair (RFC 8037): Ed25519.
    #[serde(rename = "OKP")]
    Okp,
    /// Elliptic curve: P-256, secp256k1.
    #[serde(rename = "EC")]
    Ec,
}

impl Kty {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kty::Okp => "OKP",
            Kty::Ec => "EC",
        }
    }
}

/// JWK curve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Crv {
    /// Ed25519 (kty OKP).
    #[serde(rename = "Ed25519")]
    Ed25519,
    /// NIST P-256 (kty EC).
    #[serde(rename = "P-256")]
    P256,
    /// secp256k1 (kty EC, RFC 8812).
    #[serde(rename = "secp256k1")]
    Secp256k1,
}

impl Crv {
    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Crv::Ed25519 => "Ed25519",
            Crv::P256 => "P-256",
            Crv::Secp256k1 => "secp256k1",
        }
    }
}

/// Why a public key cannot become a JWK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwkError {
    /// Wrong length or encoding for the curve.
    #[error("{crv} public key: {reason}")]
    BadPublicKey {
        /// Curve.
        crv: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// A public JWK (`kty`, `crv`, `x`, `y` for EC, `kid`, `alg`, `use`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type.
    pub kty: Kty,
    /// Curve.
    pub crv: Crv,
    /// base64url: Ed25519 public key (32 bytes) or EC x coordinate (32 bytes, full width).
    pub x: String,
    /// base64url EC y coordinate (32 bytes, full width); absent for OKP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// Key id: the RFC 7638 thumbprint unless set otherwise.
    pub kid: String,
    /// The one JWS algorithm this key is for.
    pub alg: JwsAlg,
    /// Public key use: always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
}

/// A JWK set, `{"keys":[...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// base64url without padding.
pub(crate) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl Jwk {
    fn new(kty: Kty, crv: Crv, x: &[u8], y: Option<&[u8]>, alg: JwsAlg) -> Jwk {
        let mut jwk = Jwk {
            kty,
            crv,
            x: b64(x),
            y: y.map(b64),
            kid: String::new(),
            alg,
            use_: "sig".to_string(),
        };
        jwk.kid = jwk.thumbprint();
        jwk
    }

    /// An Ed25519 key (`alg` EdDSA) from its 32-byte public key; kid = thumbprint.
    pub fn ed25519(public_key: &[u8]) -> Result<Jwk, JwkError> {
        let pk: [u8; 32] = public_key.try_into().map_err(|_| JwkError::BadPublicKey {
            crv: "Ed25519",
            reason: "not 32 bytes",
        })?;
        ed25519_dalek::VerifyingKey::from_bytes(&pk).map_err(|_| JwkError::BadPublicKey {
            crv: "Ed25519",
            reason: "not a valid point",
        })?;
        Ok(Jwk::new(Kty::Okp, Crv::Ed25519, &pk, None, JwsAlg::EdDSA))
    }

    /// A P-256 key (`alg` ES256) from a 65-byte uncompressed SEC1 point; kid = thumbprint.
    pub fn ec_p256(sec1: &[u8]) -> Result<Jwk, JwkError> {
        let (x, y) = split_sec1(sec1, "P-256")?;
        p256::ecdsa::VerifyingKey::from_sec1_bytes(sec1).map_err(|_| JwkError::BadPublicKey {
            crv: "P-256",
            reason: "not a point on the curve",
        })?;
        Ok(Jwk::new(Kty::Ec, Crv::P256, x, Some(y), JwsAlg::ES256))
    }

    /// A secp256k1 key (`alg` ES256K) from a 65-byte uncompressed SEC1 point; kid = thumbprint.
    pub fn ec_secp256k1(sec1: &[u8]) -> Result<Jwk, JwkError> {
        let (x, y) = split_sec1(sec1, "secp256k1")?;
        k256::ecdsa::VerifyingKey::from_sec1_bytes(sec1).map_err(|_| JwkError::BadPublicKey {
            crv: "secp256k1",
            reason: "not a point on the curve",
        })?;
        Ok(Jwk::new(Kty::Ec, Crv::Secp256k1, x, Some(y), JwsAlg::ES256K))
    }

    /// The same key with another kid.
    pub fn with_kid(mut self, kid: impl Into<String>) -> Jwk {
        self.kid = kid.into();
        self
    }

    /// The RFC 7638 canonical JSON: required members only, lexicographic order, no whitespace.
    pub fn thumbprint_input(&self) -> String {
        self.canonical_value().to_string()
    }

    /// RFC 7638 SHA-256 thumbprint, base64url without padding.
    pub fn thumbprint(&self) -> String {
        b64(&Sha256::digest(self.thumbprint_input().as_bytes()))
    }

    /// The canonical members as JSON, escaped by serde_json (robust against any value).
    fn canonical_value(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("crv".into(), self.crv.as_str().into());
        m.insert("kty".into(), self.kty.as_str().into());
        m.insert("x".into(), self.x.clone().into());
        if self.kty == Kty::Ec {
            m.insert("y".into(), self.y.clone().unwrap_or_default().into());
        }
        // Inserted in lexicographic order: sorted both as a BTreeMap and with `preserve_order`.
        serde_json::Value::Object(m)
    }
}

fn split_sec1<'a>(sec1: &'a [u8], crv: &'static str) -> Result<(&'a [u8], &'a [u8]), JwkError> {
    match sec1 {
        [0x04, rest @ ..] if rest.len() == 64 => Ok(rest.split_at(32)),
        _ => Err(JwkError::BadPublicKey {
            crv,
            reason: "not a 65-byte uncompressed SEC1 point",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

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

    #[test]
    fn rfc8037_ed25519_thumbprint() {
        let v = vector("rfc8037_ed25519.json");
        let jwk = Jwk::ed25519(&unb64(s(&v, "/A2_public_jwk/x"))).expect("valid key");
        assert_eq!(jwk.x, s(&v, "/A2_public_jwk/x"));
        assert_eq!(jwk.thumbprint_input(), s(&v, "/A3_thumbprint/canonical_input"));
        assert_eq!(jwk.thumbprint(), s(&v, "/A3_thumbprint/base64url"));
        assert_eq!(jwk.kid, jwk.thumbprint());
        assert_eq!(
            hex::encode(Sha256::digest(jwk.thumbprint_input().as_bytes())),
            s(&v, "/A3_thumbprint/sha256_hex")
        );
        let t = vector("rfc7638_thumbprint.json");
        assert_eq!(jwk.thumbprint(), s(&t, "/okp_example/thumbprint_b64url"));
        assert_eq!(jwk.thumbprint_input(), s(&t, "/okp_example/canonical_input"));
    }

    #[test]
    fn rfc7638_rules_on_ec_and_the_rsa_example_hash() {
        let t = vector("rfc7638_thumbprint.json");
        // The RSA example checks our hash + base64url step on the RFC's own canonical input.
        let input = s(&t, "/rsa_example/canonical_input");
        assert_eq!(
            b64(&Sha256::digest(input.as_bytes())),
            s(&t, "/rsa_example/thumbprint_b64url")
        );
        // EC: members crv,kty,x,y in order; alg/kid/use excluded.
        let a3 = vector("rfc7515_a3_es256.json");
        let mut sec1 = vec![4u8];
        sec1.extend(unb64(s(&a3, "/public_jwk/x")));
        sec1.extend(unb64(s(&a3, "/public_jwk/y")));
        let jwk = Jwk::ec_p256(&sec1).expect("valid key");
        let want = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            s(&a3, "/public_jwk/x"),
            s(&a3, "/public_jwk/y")
        );
        assert_eq!(jwk.thumbprint_input(), want);
        assert_eq!(jwk.thumbprint(), b64(&Sha256::digest(want.as_bytes())));
        assert_eq!(jwk.clone().with_kid("other").thumbprint(), jwk.thumbprint());
    }

    #[test]
    fn serialisation_has_public_members_only() {
        let sk = k256::ecdsa::SigningKey::from_slice(&[3u8; 32]).expect("key");
        let sec1 = sk.verifying_key().to_encoded_point(false);
        let jwk = Jwk::ec_secp256k1(sec1.as_bytes()).expect("valid key");
        let v = serde_json::to_value(&jwk).expect("json");
        let mut keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        assert_eq!(keys, ["alg", "crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(v["crv"], "secp256k1");
        assert_eq!(v["alg"], "ES256K");
        assert_eq!(v["use"], "sig");
        let back: Jwk = serde_json::from_value(v).expect("parse");
        assert_eq!(back, jwk);
        let ed = Jwk::ed25519(&[0x3b; 32]);
        if let Ok(ed) = ed {
            let v = serde_json::to_value(&ed).expect("json");
            assert!(v.get("y").is_none());
            assert_eq!(v["kty"], "OKP");
        }
    }

    #[test]
    fn bad_public_keys() {
        assert!(Jwk::ed25519(&[1u8; 31]).is_err());
        assert!(Jwk::ec_p256(&[4u8; 65]).is_err());
        assert!(Jwk::ec_secp256k1(&[2u8; 33]).is_err());
        assert!(Jwk::ec_p256(&[]).is_err());
    }
}
