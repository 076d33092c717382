//! Fuzz target bodies, shared by the coverage-guided targets in `fuzz/` and by the corpus
//! replay test `tests/fuzz_corpus.rs`: each takes arbitrary bytes, never panics on them, and
//! panics only when a property of the code under test fails (which a fuzzer reports as a
//! crash). The daemon never calls this module; it is hidden from the docs.
//!
//! Targets whose input must carry a valid signature to get past the first check (JWS, audit
//! checkpoints, recovery) let a leading mode byte ask the harness to sign the fuzzed header,
//! payload or digest with one of a few fixed keys, so the fuzzer also reaches the code after
//! the signature check; the oracle then knows what the answer must be.

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use k256::ecdsa::signature::hazmat::{PrehashSigner as _, PrehashVerifier as _};
use num_bigint::BigUint;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256, Sha512};

use crate::audit::checkpoint::CheckpointClaims;
use crate::audit::export::event_line;
use crate::audit::verify::verify_export;
use crate::audit::{canonical, link, Checkpoint, Event, NewEvent, CHECKPOINT_TYP};
use crate::crypto::eip712::TypedData;
use crate::crypto::eth::{recover_address, to_recoverable, Address};
use crate::crypto::jwk::Jwk;
use crate::crypto::jws::{sign_compact, verify_compact, JwsAlg, JwsError, Verified, MAX_TOKEN_LEN};
use crate::session::{Asset, Scope, Scopes, SCOPE_GRAMMAR};
use crate::tls::identity::{identity_with, IdentityFallback, IdentityRules};

mod proto;
pub use proto::{proto_handler, proto_rpc_path, PROTO_CALLERS, PROTO_CONTROLLER, PROTO_RPCS};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target: its name (the file name under `fuzz/fuzz_targets/` and the corpus folder
/// under `fuzz/corpus/`) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("eip712", eip712),
    ("jws", jws),
    ("jwt_differential", jwt_differential),
    ("audit", audit),
    ("eth_recover", eth_recover),
    ("scope", scope),
    ("tls_identity", tls_identity),
    ("proto_handler", proto_handler),
];

/// A cursor over the fuzz input.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// The next byte, 0 once the input is used up.
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    /// The next `n` bytes (fewer at the end).
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    /// Everything left.
    fn rest(self) -> &'a [u8] {
        self.0
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// Fixed keys

/// One software key per JWS algorithm, their keyward JWKs, and the same keys as
/// `jsonwebtoken` reads them from keyward's published JSON.
pub struct FixedKeys {
    ed: ed25519_dalek::SigningKey,
    p256: p256::ecdsa::SigningKey,
    k256: k256::ecdsa::SigningKey,
    /// keyward's JWKS: EdDSA, ES256, ES256K (in that order).
    pub jwks: Vec<Jwk>,
    /// The EdDSA and ES256 keys as `jsonwebtoken` JWKs, parsed from keyward's JSON. The
    /// ES256K key is not there: `jsonwebtoken` knows neither the curve nor the algorithm.
    pub jwt: jsonwebtoken::jwk::JwkSet,
}

impl FixedKeys {
    /// keyward's JWK for `alg`.
    pub fn jwk(&self, alg: JwsAlg) -> &Jwk {
        let i = match alg {
            JwsAlg::EdDSA => 0,
            JwsAlg::ES256 => 1,
            JwsAlg::ES256K => 2,
        };
        &self.jwks[i]
    }
}

/// The fixed keys (built once per process).
pub fn fixed_keys() -> &'static FixedKeys {
    static KEYS: OnceLock<FixedKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let ed = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let p256 = p256::ecdsa::SigningKey::from_slice(&[8u8; 32]).expect("fixed P-256 scalar");
        let k256 = k256::ecdsa::SigningKey::from_slice(&[9u8; 32]).expect("fixed secp256k1 scalar");
        let jwks = vec![
            Jwk::ed25519(ed.verifying_key().as_bytes()).expect("fixed Ed25519 key"),
            Jwk::ec_p256(p256.verifying_key().to_encoded_point(false).as_bytes()).expect("fixed P-256 key"),
            Jwk::ec_secp256k1(k256.verifying_key().to_encoded_point(false).as_bytes()).expect("fixed k256 key"),
        ];
        let jwt = jsonwebtoken::jwk::JwkSet {
            keys: jwks[..2]
                .iter()
                .map(|k| {
                    let json = serde_json::to_value(k).expect("JWK serialises");
                    serde_json::from_value(json).expect("jsonwebtoken reads keyward's EdDSA and ES256 JWKs")
                })
                .collect(),
        };
        FixedKeys {
            ed,
            p256,
            k256,
            jwks,
            jwt,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Signing fuzzed tokens

/// How the harness signs a fuzzed header and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// Ed25519 with the fixed key.
    EdDSA,
    /// Ed25519 by the key's owner with R = the identity point (s = k·a mod ℓ): valid under
    /// the cofactorless equation (`verify`), refused by `verify_strict`.
    EdDSASmallOrderR,
    /// P-256 with the fixed key, either s form.
    ES256 {
        /// Negate s after signing.
        high_s: bool,
    },
    /// secp256k1 with the fixed key, either s form.
    ES256K {
        /// Negate s after signing.
        high_s: bool,
    },
}

impl Signer {
    /// The JWS algorithm.
    pub fn alg(self) -> JwsAlg {
        match self {
            Signer::EdDSA | Signer::EdDSASmallOrderR => JwsAlg::EdDSA,
            Signer::ES256 { .. } => JwsAlg::ES256,
            Signer::ES256K { .. } => JwsAlg::ES256K,
        }
    }

    /// Whether a keyward verifier must refuse the signature whatever the header and payload.
    fn always_refused(self) -> bool {
        matches!(self, Signer::EdDSASmallOrderR | Signer::ES256K { high_s: true })
    }
}

/// The Ed25519 group order ℓ.
fn ed25519_order() -> BigUint {
    (BigUint::from(1u8) << 252usize)
        + BigUint::parse_bytes(b"27742317777372353535851937790883648493", 10).expect("decimal constant")
}

/// An Ed25519 signature with R = identity: s = SHA-512(R‖A‖M)·a mod ℓ.
fn ed25519_small_order_r(key: &ed25519_dalek::SigningKey, msg: &[u8]) -> [u8; 64] {
    let mut r = [0u8; 32];
    r[0] = 1; // the identity point, y = 1
    let expanded = Sha512::digest(key.to_bytes());
    let mut a = [0u8; 32];
    a.copy_from_slice(&expanded[..32]);
    a[0] &= 248;
    a[31] &= 127;
    a[31] |= 64;
    let k = Sha512::new()
        .chain_update(r)
        .chain_update(key.verifying_key().as_bytes())
        .chain_update(msg)
        .finalize();
    let l = ed25519_order();
    let s = (BigUint::from_bytes_le(&k) % &l) * BigUint::from_bytes_le(&a) % &l;
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&r);
    let s = s.to_bytes_le();
    out[32..32 + s.len()].copy_from_slice(&s);
    out
}

macro_rules! ecdsa_rs {
    ($name:ident, $curve:ident) => {
        /// r‖s by `key` over a digest, low-s, or its high-s twin when `high_s` (what an HSM
        /// may return: either form verifies).
        pub fn $name(key: &$curve::ecdsa::SigningKey, digest: &[u8], high_s: bool) -> Vec<u8> {
            let sig: $curve::ecdsa::Signature = key.sign_prehash(digest).expect("a digest signs");
            let sig = sig.normalize_s().unwrap_or(sig);
            let sig = if high_s {
                $curve::ecdsa::Signature::from_scalars(sig.r(), -*sig.s()).expect("-s is a valid s")
            } else {
                sig
            };
            sig.to_bytes().to_vec()
        }
    };
}
ecdsa_rs!(p256_rs, p256);
ecdsa_rs!(k256_rs, k256);

fn sign_input(signer: Signer, input: &[u8]) -> Vec<u8> {
    let keys = fixed_keys();
    match signer {
        Signer::EdDSA => keys.ed.sign(input).to_bytes().to_vec(),
        Signer::EdDSASmallOrderR => ed25519_small_order_r(&keys.ed, input).to_vec(),
        Signer::ES256 { high_s } => p256_rs(&keys.p256, &Sha256::digest(input), high_s),
        Signer::ES256K { high_s } => k256_rs(&keys.k256, &Sha256::digest(input), high_s),
    }
}

/// `b64(header).b64(payload).b64(signature)` with the header and payload bytes as given.
pub fn sign_parts(signer: Signer, header: &[u8], payload: &[u8]) -> String {
    let mut token = format!("{}.{}", b64(header), b64(payload));
    let sig = sign_input(signer, token.as_bytes());
    token.push('.');
    token.push_str(&b64(&sig));
    token
}

/// A token made from fuzz bytes.
struct FuzzToken {
    token: String,
    /// How the harness signed it, and the header and payload it signed.
    signed: Option<(Signer, Vec<u8>, Vec<u8>)>,
}

/// Mode byte, then: modes 0-2 the token text itself; otherwise header bytes, 0x00, payload
/// bytes (`{}` without a 0x00), signed by the harness.
fn token_from(data: &[u8]) -> Option<FuzzToken> {
    let mut input = Input(data);
    let signer = match input.byte() % 8 {
        0..=2 => {
            let token = String::from_utf8(input.rest().to_vec()).ok()?;
            return Some(FuzzToken { token, signed: None });
        }
        3 => Signer::EdDSA,
        4 => Signer::ES256 { high_s: false },
        5 => Signer::ES256 { high_s: true },
        6 => Signer::ES256K {
            high_s: input.byte() % 2 == 1,
        },
        _ => Signer::EdDSASmallOrderR,
    };
    let rest = input.rest();
    let (header, payload) = match rest.iter().position(|b| *b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b"{}"[..]),
    };
    Some(FuzzToken {
        token: sign_parts(signer, header, payload),
        signed: Some((signer, header.to_vec(), payload.to_vec())),
    })
}

// ---------------------------------------------------------------------------------------------
// An independent reading of JSON objects and tokens

/// The members of a JSON object in order, duplicates kept; `None` if `bytes` is not one.
fn members(bytes: &[u8]) -> Option<Vec<(String, Value)>> {
    struct Members(Vec<(String, Value)>);
    impl<'de> Deserialize<'de> for Members {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                    let mut out = Vec::new();
                    while let Some(entry) = map.next_entry::<String, Value>()? {
                        out.push(entry);
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<Members>(bytes).ok().map(|m| m.0)
}

fn has_duplicates(m: &[(String, Value)]) -> bool {
    let mut names: Vec<&str> = m.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    names.windows(2).any(|w| w[0] == w[1])
}

fn member<'a>(m: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    m.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// The three parts of a compact token, decoded.
struct Parts<'a> {
    input: &'a str,
    header: Vec<u8>,
    payload: Vec<u8>,
    sig_b64: &'a str,
    signature: Vec<u8>,
}

fn split(token: &str) -> Option<Parts<'_>> {
    let (input, sig_b64) = token.rsplit_once('.')?;
    let (h, p) = input.split_once('.')?;
    Some(Parts {
        input,
        header: URL_SAFE_NO_PAD.decode(h).ok()?,
        payload: URL_SAFE_NO_PAD.decode(p).ok()?,
        sig_b64,
        signature: URL_SAFE_NO_PAD.decode(sig_b64).ok()?,
    })
}

/// keyward's rules for a token correctly signed by the key of `alg`: is it acceptable?
fn acceptable(alg: JwsAlg, header: &[u8], payload: &[u8], token_len: usize) -> bool {
    let kid = &fixed_keys().jwk(alg).kid;
    let (Some(h), Some(p)) = (members(header), members(payload)) else {
        return false;
    };
    token_len <= MAX_TOKEN_LEN
        && !has_duplicates(&h)
        && !has_duplicates(&p)
        && member(&h, "alg") == Some(&Value::String(alg.as_str().into()))
        && member(&h, "kid") == Some(&Value::String(kid.clone()))
        && member(&h, "typ").is_none_or(Value::is_string)
        && member(&h, "crit").is_none()
}

/// The signature checked with the curve libraries directly, against the fixed public keys.
fn signature_valid(alg: JwsAlg, input: &[u8], sig: &[u8]) -> bool {
    let keys = fixed_keys();
    match alg {
        JwsAlg::EdDSA => ed25519_dalek::Signature::from_slice(sig)
            .is_ok_and(|s| keys.ed.verifying_key().verify_strict(input, &s).is_ok()),
        JwsAlg::ES256 => p256::ecdsa::Signature::from_slice(sig).is_ok_and(|s| {
            keys.p256
                .verifying_key()
                .verify_prehash(&Sha256::digest(input), &s)
                .is_ok()
        }),
        JwsAlg::ES256K => k256::ecdsa::Signature::from_slice(sig).is_ok_and(|s| {
            s.normalize_s().is_none()
                && keys
                    .k256
                    .verifying_key()
                    .verify_prehash(&Sha256::digest(input), &s)
                    .is_ok()
        }),
    }
}

/// What must hold of any token keyward accepted.
fn check_accepted(token: &str, v: &Verified) {
    let keys = fixed_keys();
    assert!(token.len() <= MAX_TOKEN_LEN, "accepted an oversized token");
    let parts = split(token).unwrap_or_else(|| panic!("accepted a token that does not split: {token:?}"));
    assert_eq!(token.matches('.').count(), 2, "accepted {token:?}");
    let h = members(&parts.header).unwrap_or_else(|| panic!("accepted a header that is not an object: {token:?}"));
    let p = members(&parts.payload).unwrap_or_else(|| panic!("accepted a payload that is not an object: {token:?}"));
    assert!(
        !has_duplicates(&h) && !has_duplicates(&p),
        "accepted duplicate members: {token:?}"
    );
    assert!(member(&h, "crit").is_none(), "accepted crit: {token:?}");
    assert_eq!(member(&h, "alg"), Some(&Value::String(v.header.alg.as_str().into())));
    let kid = v
        .header
        .kid
        .as_deref()
        .unwrap_or_else(|| panic!("accepted without kid: {token:?}"));
    assert_eq!(member(&h, "kid"), Some(&Value::String(kid.into())));
    assert_eq!(
        member(&h, "typ").cloned(),
        v.header.typ.clone().map(Value::String),
        "{token:?}"
    );
    assert_eq!(
        keys.jwk(v.header.alg).kid,
        kid,
        "accepted under a key of another alg: {token:?}"
    );
    assert!(
        signature_valid(v.header.alg, parts.input.as_bytes(), &parts.signature),
        "accepted a signature the curve library refuses: {token:?}"
    );
    let claims: serde_json::Map<String, Value> = p.into_iter().collect();
    assert_eq!(v.claims, Value::Object(claims), "{token:?}");
}

// ---------------------------------------------------------------------------------------------
// Targets

/// `TypedData::from_slice`: never panics; a parsed document hashes the same twice and
/// through `from_value` (the entry point for already parsed JSON).
pub fn eip712(data: &[u8]) {
    let Ok(td) = TypedData::from_slice(data) else {
        return;
    };
    let hash = td.signing_hash();
    assert_eq!(td.signing_hash(), hash, "signing hash is not deterministic");
    assert!(
        td.encode_type(td.primary_type()).is_ok(),
        "primary type does not encode"
    );
    let _ = (
        td.domain_name(),
        td.domain_version(),
        td.domain_chain_id(),
        td.domain_verifying_contract(),
    );
    // The one-pass reader and `serde_json::Value` read the same document.
    let value: Value = serde_json::from_slice(data).expect("from_slice parsed it");
    assert_eq!(Some(td.message()), value.get("message"), "the message read differs");
    let again = TypedData::from_value(&value).expect("from_value refuses what from_slice took");
    assert_eq!(again.signing_hash(), hash, "from_value disagrees with from_slice");
    // What a session reads of a transfer: never panics, the same twice, and a
    // recognised one names a token and the type it was recognised by.
    let transfer = crate::session::transfer::recognise(&td);
    assert_eq!(
        transfer,
        crate::session::transfer::recognise(&again),
        "recognition is not deterministic"
    );
    if let Ok(Some(t)) = transfer {
        assert_eq!(t.kind.name(), td.primary_type());
        assert!(matches!(t.asset, crate::session::Asset::Erc20 { .. }));
    }
}

/// `jws::verify_compact` against the fixed keys: whatever it accepts satisfies every rule
/// (checked independently), and a token the harness signed is accepted exactly when its
/// header and payload follow keyward's rules.
pub fn jws(data: &[u8]) {
    let Some(t) = token_from(data) else {
        return;
    };
    let keys = fixed_keys();
    let result = verify_compact(&t.token, &keys.jwks);
    if let Ok(v) = &result {
        check_accepted(&t.token, v);
    }
    if let Some((signer, header, payload)) = &t.signed {
        let expected = !signer.always_refused() && acceptable(signer.alg(), header, payload, t.token.len());
        assert_eq!(result.is_ok(), expected, "{signer:?} token {:?}: {result:?}", t.token);
        if *signer == (Signer::ES256K { high_s: true }) && acceptable(signer.alg(), header, payload, t.token.len()) {
            assert_eq!(result, Err(JwsError::HighS));
        }
    }
}

/// Why keyward refuses a token that `jsonwebtoken` accepts: the rules keyward adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strictness {
    /// Longer than [`MAX_TOKEN_LEN`].
    TooLarge,
    /// A header or payload member appears twice (serde keeps the last one).
    DuplicateMember,
    /// The header has `crit` (RFC 7515 §4.1.11: refuse what you do not understand).
    Crit,
    /// `typ` present but not a string (`jsonwebtoken` reads `null` as absent).
    NonStringTyp,
    /// The payload is not a JSON object.
    PayloadNotObject,
    /// An Ed25519 signature whose R is a small-order point (`verify_strict`).
    Ed25519SmallOrderR,
}

/// The keyward rule, if any, that `token` breaks and `jsonwebtoken` does not check.
fn strictness(token: &str) -> Option<Strictness> {
    if token.len() > MAX_TOKEN_LEN {
        return Some(Strictness::TooLarge);
    }
    let parts = split(token)?;
    let h = members(&parts.header)?;
    if has_duplicates(&h) || members(&parts.payload).is_some_and(|p| has_duplicates(&p)) {
        return Some(Strictness::DuplicateMember);
    }
    if member(&h, "crit").is_some() {
        return Some(Strictness::Crit);
    }
    if member(&h, "typ").is_some_and(|t| !t.is_string()) {
        return Some(Strictness::NonStringTyp);
    }
    if members(&parts.payload).is_none() {
        return Some(Strictness::PayloadNotObject);
    }
    if member(&h, "alg") == Some(&Value::String("EdDSA".into())) {
        let r: Option<[u8; 32]> = parts.signature.get(..32).and_then(|r| r.try_into().ok());
        if r.is_some_and(|r| ed25519_dalek::VerifyingKey::from_bytes(&r).is_ok_and(|k| k.is_weak())) {
            return Some(Strictness::Ed25519SmallOrderR);
        }
    }
    None
}

/// How keyward's verifier and `jsonwebtoken`'s compare on one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Both accept, with the same header and claims.
    BothAccept,
    /// Both refuse.
    BothReject,
    /// keyward refuses by one of its documented rules; `jsonwebtoken` accepts.
    KeywardStricter(Strictness),
    /// keyward accepts a header `jsonwebtoken`'s typed `Header` cannot hold (an extension
    /// member that is not a string, a malformed registered member keyward ignores); the
    /// signature checks out in `jsonwebtoken` too.
    JwtHeaderTyping,
    /// keyward accepts claims whose `sub` is an array or an object; `jsonwebtoken` fails to
    /// read them even with no claim checks asked for (its internal claims reader does not
    /// skip a value of the wrong type); the signature checks out in `jsonwebtoken` too.
    JwtClaimsTyping,
    /// A valid ES256K token: `jsonwebtoken` has no ES256K.
    JwtLacksEs256k,
}

/// `jsonwebtoken`'s verdict, used as a third-party verifier would: the key named by the
/// header's kid in the JWKS, the algorithm the JWK names, no claim checks.
fn jwt_decode(token: &str) -> Option<jsonwebtoken::TokenData<Value>> {
    let (key, alg) = jwt_key(&jsonwebtoken::decode_header(token).ok()?.kid?)?;
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &key, &validation).ok()
}

fn jwt_key(kid: &str) -> Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Algorithm)> {
    let jwk = fixed_keys().jwt.find(kid)?;
    let alg: jsonwebtoken::Algorithm = jwk.common.key_algorithm?.to_string().parse().ok()?;
    Some((jsonwebtoken::DecodingKey::from_jwk(jwk).ok()?, alg))
}

/// `jsonwebtoken`'s signature check alone, bypassing its typed header.
fn jwt_signature_valid(token: &str) -> bool {
    let Some(parts) = split(token) else {
        return false;
    };
    let kid = members(&parts.header).and_then(|h| member(&h, "kid").and_then(Value::as_str).map(str::to_owned));
    let Some((key, alg)) = kid.and_then(|k| jwt_key(&k)) else {
        return false;
    };
    jsonwebtoken::crypto::verify(parts.sig_b64, parts.input.as_bytes(), &key, alg).unwrap_or(false)
}

/// Feeds `token` to keyward's verifier and to `jsonwebtoken`'s and panics on any
/// disagreement that no documented rule explains. Rules, in both directions:
/// - keyward accepts ⇒ `jsonwebtoken` accepts with equal alg, kid, typ and claims; or the
///   algorithm is ES256K; or `jsonwebtoken`'s signature check accepts while its typed header
///   refuses the header or its claims reader a `sub` that is not a string. And no
///   [`Strictness`] rule applies.
/// - `jsonwebtoken` accepts ⇒ keyward accepts, unless a [`Strictness`] rule applies, and
///   then keyward refuses.
pub fn differential(token: &str) -> Outcome {
    let ours = verify_compact(token, &fixed_keys().jwks);
    let theirs = jwt_decode(token);
    let rule = strictness(token);
    if ours.is_ok() {
        assert_eq!(rule, None, "keyward accepted a token breaking its own rule: {token:?}");
    }
    match (ours, theirs) {
        (Ok(v), Some(t)) => {
            assert_eq!(v.claims, t.claims, "claims differ: {token:?}");
            assert_eq!(format!("{:?}", t.header.alg), v.header.alg.as_str(), "{token:?}");
            assert_eq!(t.header.kid, v.header.kid, "{token:?}");
            assert_eq!(t.header.typ, v.header.typ, "{token:?}");
            Outcome::BothAccept
        }
        (Err(_), None) => Outcome::BothReject,
        (Err(e), Some(_)) => match rule {
            Some(r) => Outcome::KeywardStricter(r),
            None => panic!("keyward refuses ({e}) a token jsonwebtoken accepts, by no documented rule: {token:?}"),
        },
        (Ok(v), None) => {
            if v.header.alg == JwsAlg::ES256K {
                return Outcome::JwtLacksEs256k;
            }
            assert!(
                jwt_signature_valid(token),
                "keyward accepts a signature jsonwebtoken refuses: {token:?}"
            );
            let parts = split(token).unwrap_or_else(|| panic!("keyward accepted {token:?}"));
            if serde_json::from_slice::<jsonwebtoken::Header>(&parts.header).is_err() {
                return Outcome::JwtHeaderTyping;
            }
            let sub = members(&parts.payload).and_then(|p| member(&p, "sub").cloned());
            assert!(
                matches!(sub, Some(Value::Array(_) | Value::Object(_))),
                "keyward accepts a token jsonwebtoken refuses: {token:?}"
            );
            Outcome::JwtClaimsTyping
        }
    }
}

/// The differential over fuzzed tokens (raw, or signed by the harness).
pub fn jwt_differential(data: &[u8]) {
    if let Some(t) = token_from(data) {
        differential(&t.token);
    }
}

/// A decoder of the canonical encoding (see [`crate::audit`]) used to check that the
/// encoding is unambiguous: `decode(canonical(seq, e)) == (seq, e)`.
pub fn decode_canonical(bytes: &[u8]) -> Option<(u64, NewEvent)> {
    let mut input = Input(bytes);
    fn u32_of(input: &mut Input<'_>) -> Option<u32> {
        Some(u32::from_be_bytes(input.take(4).try_into().ok()?))
    }
    fn str_of(input: &mut Input<'_>) -> Option<String> {
        let len = usize::try_from(u32_of(input)?).ok()?;
        let bytes = input.take(len);
        (bytes.len() == len).then_some(())?;
        String::from_utf8(bytes.to_vec()).ok()
    }
    (input.take(16) == b"keyward.audit.v1").then_some(())?;
    let seq = u64::from_be_bytes(input.take(8).try_into().ok()?);
    let time_ms = i64::from_be_bytes(input.take(8).try_into().ok()?);
    let mut s = || str_of(&mut input);
    let (identity, action, account, session, request_id, decision) = (s()?, s()?, s()?, s()?, s()?, s()?);
    let n = u32_of(&mut input)?;
    let policies = (0..n).map(|_| str_of(&mut input)).collect::<Option<Vec<_>>>()?;
    let (code, digest, signature_ref) = (str_of(&mut input)?, str_of(&mut input)?, str_of(&mut input)?);
    // The trace id is written only when there is one: an empty one written
    // would be a second encoding of the same event.
    let trace_id = match input.0.is_empty() {
        true => String::new(),
        false => Some(str_of(&mut input)?).filter(|t| !t.is_empty())?,
    };
    input.rest().is_empty().then_some(())?;
    Some((
        seq,
        NewEvent {
            time_ms,
            identity,
            action,
            account,
            session,
            request_id,
            decision,
            policies,
            code,
            digest,
            signature_ref,
            trace_id,
        },
    ))
}

/// The audit export decoder (JSON Lines of events and checkpoints, as `keyward audit verify
/// --file` reads them), the canonical encoding, and the verifier. Flags byte: bit 0 relinks
/// the chain (correct `prev_hash` and `hash` for the fuzzed contents), bit 1 re-signs every
/// checkpoint with the fixed EdDSA key over the events it names.
pub fn audit(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.byte();
    let Ok(text) = std::str::from_utf8(input.rest()) else {
        return;
    };
    let mut events: Vec<Event> = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(e) = serde_json::from_str::<Event>(line) {
            events.push(e);
        } else if let Ok(c) = serde_json::from_str::<Checkpoint>(line) {
            checkpoints.push(c);
        } else {
            return; // `read_export` refuses the file
        }
    }
    for e in &events {
        let line = event_line(e).expect("an event encodes");
        assert_eq!(
            serde_json::from_str::<Event>(&line).ok().as_ref(),
            Some(e),
            "export round trip"
        );
        let decoded = decode_canonical(&canonical(e.seq, &e.body));
        assert_eq!(
            decoded,
            Some((e.seq, e.body.clone())),
            "canonical encoding is ambiguous"
        );
    }
    let relink = flags & 1 == 1;
    if relink {
        let mut prev = events.first().map(|e| e.prev_hash).unwrap_or_default();
        for e in &mut events {
            e.prev_hash = prev;
            e.hash = link(&prev, e.seq, &e.body);
            prev = e.hash;
        }
    }
    let dense = events.first().is_none_or(|f| f.seq >= 1)
        && events.windows(2).all(|w| w[0].seq.checked_add(1) == Some(w[1].seq));
    let covered = |c: &Checkpoint| -> Option<Vec<[u8; 32]>> {
        let first = events.first()?.seq;
        let from = usize::try_from(c.first_seq.checked_sub(first)?).ok()?;
        let to = usize::try_from(c.last_seq.checked_sub(first)?).ok()?;
        // `get(1..=0)` is an empty slice, not None: an inverted range covers nothing.
        let range = events.get(from..=to).filter(|r| !r.is_empty())?;
        Some(range.iter().map(|e| e.hash).collect())
    };
    let resign = flags & 2 == 2;
    if resign {
        let keys = fixed_keys();
        for c in &mut checkpoints {
            let hashes = covered(c);
            let root = hashes.as_deref().map_or(c.root, crate::audit::merkle::root);
            let last_hash = hashes.as_deref().and_then(<[_]>::last).copied().unwrap_or(c.root);
            c.root = root;
            let claims = serde_json::to_value(CheckpointClaims {
                first_seq: c.first_seq,
                last_seq: c.last_seq,
                root,
                last_hash,
                iat: c.created_at,
            })
            .expect("claims encode");
            let kid = &keys.jwk(JwsAlg::EdDSA).kid;
            c.jws = sign_compact(JwsAlg::EdDSA, kid, CHECKPOINT_TYP, &claims, |input| {
                Ok::<_, JwsError>(keys.ed.sign(input).to_bytes().to_vec())
            })
            .expect("checkpoint signs");
        }
    }
    let report = verify_export(
        &events,
        &checkpoints,
        &crate::jwks::history::KeyHistory::from_jwks(&fixed_keys().jwks),
    );
    if relink && dense && (checkpoints.is_empty() || resign) {
        let all_covered = checkpoints.iter().all(|c| covered(c).is_some());
        if all_covered {
            assert!(
                report.ok(),
                "a relinked dense chain with checkpoints over it fails: {report:?}"
            );
            assert_eq!(report.events, events.len() as u64);
            assert_eq!(report.checkpoints_verified, checkpoints.len() as u64);
        }
    }
    if relink && !dense {
        assert!(
            !report.ok(),
            "a chain with a gap or a repeated seq verifies: {report:?}"
        );
    }
}

/// Recovery (`to_recoverable`): for a fixed key, a digest and r‖s, it succeeds exactly when
/// r‖s verifies under the key, and then yields low-s r‖s‖v that recovers the key's address.
///
/// The mode byte's high nibble picks one of four keys; its low three bits pick the input:
/// 0 and 7 fuzzed digest and r‖s; 1–3 one of 64 signatures per key made once at start
/// (low-s, its high-s twin, or with the rest of the input XORed into r‖s); 4–6 the same
/// three forms of a signature made now over the fuzzed digest. The signatures made at start
/// spare the common case a signing, so the target runs several times faster; the fresh ones
/// keep every digest reachable.
pub fn eth_recover(data: &[u8]) {
    type Signed = ([u8; 32], Vec<u8>, Vec<u8>);
    static KEYS: OnceLock<Vec<(k256::ecdsa::SigningKey, Vec<Signed>)>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        (1u8..=4)
            .map(|i| {
                let key = k256::ecdsa::SigningKey::from_slice(&[i; 32]).expect("fixed scalar");
                let table = (0u8..64)
                    .map(|j| {
                        let prehash: [u8; 32] = Sha256::digest([i, j]).into();
                        let low = k256_rs(&key, &prehash, false);
                        let high = k256_rs(&key, &prehash, true);
                        (prehash, low, high)
                    })
                    .collect();
                (key, table)
            })
            .collect()
    });
    let mut input = Input(data);
    let mode = input.byte();
    let (key, table) = &keys[usize::from(mode >> 4) % keys.len()];
    let vk = key.verifying_key();
    let (prehash, raw, known_valid) = match mode % 8 {
        kind @ 1..=3 => {
            let (prehash, low, high) = &table[usize::from(input.byte()) % table.len()];
            let mut raw = if kind == 2 { high.clone() } else { low.clone() };
            if kind == 3 {
                for (i, b) in input.rest().iter().enumerate() {
                    raw[i % 64] ^= b;
                }
            }
            (*prehash, raw, kind != 3)
        }
        kind => {
            let mut prehash = [0u8; 32];
            let h = input.take(32);
            prehash[..h.len()].copy_from_slice(h);
            match kind {
                4..=6 => {
                    let mut raw = k256_rs(key, &prehash, kind == 5);
                    if kind == 6 {
                        for (i, b) in input.rest().iter().enumerate() {
                            raw[i % 64] ^= b;
                        }
                    }
                    (prehash, raw, kind != 6)
                }
                _ => (prehash, input.rest().to_vec(), false),
            }
        }
    };
    // Signatures known to be valid skip the independent check (they were made by the key).
    let valid = known_valid
        || k256::ecdsa::Signature::from_slice(&raw)
            .is_ok_and(|s| vk.verify_prehash(&prehash, &s.normalize_s().unwrap_or(s)).is_ok());
    match to_recoverable(vk, &prehash, &raw) {
        Ok(sig65) => {
            assert!(
                valid,
                "recovered a signature that does not verify: {}",
                hex::encode(&raw)
            );
            let low = k256::ecdsa::Signature::from_slice(&sig65[..64]).expect("r||s");
            assert!(low.normalize_s().is_none(), "not low-s");
            assert!(matches!(sig65[64], 27 | 28));
            assert_eq!(
                recover_address(&prehash, &sig65).ok(),
                Some(Address::from_public_key(vk)),
                "recovers another address"
            );
        }
        Err(e) => assert!(!valid, "a valid signature refused ({e}): {}", hex::encode(&raw)),
    }
    if raw.len() == 65 {
        let _ = recover_address(&prehash, &raw);
    }
}

/// Session scope parsing: lines of the input are scope strings. What parses prints back as
/// itself (the address of a typed-data scope in lowercase) and re-parses equal, and every
/// scope covers what it names.
pub fn scope(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let items: Vec<&str> = text.split('\n').take(64).collect();
    for item in &items {
        if let Ok(s) = Scope::parse(item) {
            let printed = s.to_string();
            assert_eq!(Scope::parse(&printed).as_ref(), Ok(&s), "{item:?} -> {printed:?}");
            match &s {
                Scope::TypedData { .. } => assert_eq!(printed.to_ascii_lowercase(), item.to_ascii_lowercase()),
                _ => assert_eq!(&printed, item, "scope is not in its one canonical form"),
            }
        }
    }
    let Ok(scopes) = Scopes::parse(&items) else {
        return;
    };
    let strings = scopes.to_strings();
    assert_eq!(Scopes::parse(&strings).as_ref(), Ok(&scopes));
    let manifest = scopes.iter().find_map(|s| match s {
        Scope::LicenseManifest(m) => Some(*m),
        _ => None,
    });
    for s in scopes.iter() {
        match s {
            Scope::Payments { asset, min, max } => {
                let payee = scopes
                    .iter()
                    .find_map(|s| match s {
                        Scope::Payee(p) => Some(*p),
                        _ => None,
                    })
                    .unwrap_or(crate::crypto::eth::Address([0; 20]));
                let asset = asset.clone().unwrap_or(Asset::Currency("USDC".into()));
                assert!(
                    scopes.check_spend(&asset, *min, &payee).is_ok()
                        && scopes.check_spend(&asset, *max, &payee).is_ok()
                );
                if let (Some(m), Asset::Currency(currency)) = (manifest, &asset) {
                    assert!(
                        scopes.check_payment(*min, currency, &payee, &m).is_ok()
                            && scopes.check_payment(*max, currency, &payee, &m).is_ok()
                    );
                }
            }
            Scope::Cap { asset, amount } => assert_eq!(scopes.cap_for(asset), Some(*amount)),
            Scope::TypedData {
                chain_id,
                verifying_contract,
                unbounded,
            } => {
                let contract = verifying_contract.to_checksum();
                let chain = chain_id.to_string();
                // Recognised transfers under any typed-data scope; anything else only unbounded.
                assert!(scopes
                    .check_typed_data(Some(&chain), Some(&contract), "Mail", true, SCOPE_GRAMMAR)
                    .is_ok());
                assert_eq!(
                    scopes
                        .check_typed_data(Some(&chain), Some(&contract), "Mail", false, SCOPE_GRAMMAR)
                        .is_ok(),
                    *unbounded
                );
                assert!(scopes
                    .check_typed_data(Some(&chain), Some(&contract), "Mail", false, 1)
                    .is_ok());
            }
            Scope::Tx { chain_id, to, selector } => {
                assert!(scopes.check_tx(*chain_id, to, *selector).is_ok());
                if selector.is_some() {
                    // Another function of the same contract, unless another scope names it.
                    let other = Some([0xff, 0xff, 0xff, 0xfe]);
                    let named = scopes.iter().any(|s| {
                        matches!(s, Scope::Tx { chain_id: c, to: t, selector: sel }
                            if c == chain_id && t == to && (sel.is_none() || *sel == other))
                    });
                    assert_eq!(scopes.check_tx(*chain_id, to, other).is_ok(), named);
                }
            }
            Scope::LicenseManifest(_) | Scope::Attest(_) | Scope::Payee(_) => {}
        }
    }
    if !scopes.iter().any(|s| matches!(s, Scope::Payments { .. })) {
        assert!(scopes
            .check_payment(
                0,
                "USDC",
                &crate::crypto::eth::Address([0; 20]),
                &manifest.unwrap_or_default()
            )
            .is_err());
    }
}

/// Client identity (`identity_with`). Mode byte 0: the rest is a DER certificate. Otherwise
/// the rest is a list of 0x00-separated fields, each a kind byte (`U` URI SAN, `D` DNS SAN,
/// `E` email SAN, `C` the CN, `c` one more CN, `I` an IP SAN) and a value, made into a
/// certificate with rcgen; the identity must be what the rules say, under every fallback set.
pub fn tls_identity(data: &[u8]) {
    const RULES: [&[IdentityFallback]; 5] = [
        &[],
        &[IdentityFallback::Dns],
        &[IdentityFallback::Cn],
        &[IdentityFallback::Dns, IdentityFallback::Cn],
        &[IdentityFallback::Cn, IdentityFallback::Dns],
    ];
    let mut input = Input(data);
    if input.byte() == 0 {
        for fallback in RULES {
            let rules = IdentityRules {
                fallback: fallback.to_vec(),
            };
            if let Ok(id) = identity_with(input.0, &rules) {
                assert!(!id.is_empty());
            }
        }
        return;
    }
    let Some((der, spec)) = certificate(input.rest()) else {
        return;
    };
    for fallback in RULES {
        let rules = IdentityRules {
            fallback: fallback.to_vec(),
        };
        let got = identity_with(&der, &rules).ok();
        assert_eq!(got, spec.expected(fallback), "{spec:?} under {fallback:?}");
        if let Some(id) = &got {
            if spec.uris.is_empty() {
                assert!(id.starts_with("dns:") || id.starts_with("cn:"), "{id:?}");
            }
        }
    }
}

/// What a generated certificate names.
#[derive(Debug, Default)]
struct CertNames {
    uris: Vec<String>,
    dns: Vec<String>,
    cns: Vec<String>,
}

impl CertNames {
    /// The identity the rules give, computed from the names put in.
    fn expected(&self, fallback: &[IdentityFallback]) -> Option<String> {
        match self.uris.as_slice() {
            [one] if !one.is_empty() => return Some(one.clone()),
            [] => {}
            _ => return None,
        }
        for f in fallback {
            let (prefix, values) = match f {
                IdentityFallback::Dns => ("dns", &self.dns),
                IdentityFallback::Cn => ("cn", &self.cns),
            };
            match values.as_slice() {
                [] => continue,
                [one] if !one.is_empty() => return Some(format!("{prefix}:{one}")),
                _ => return None,
            }
        }
        None
    }
}

fn certificate(spec: &[u8]) -> Option<(Vec<u8>, CertNames)> {
    use rcgen::{CertificateParams, DistinguishedName, DnType, Ia5String, KeyPair, SanType};
    static KEY: OnceLock<Option<KeyPair>> = OnceLock::new();
    let key = KEY.get_or_init(|| KeyPair::generate().ok()).as_ref()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let mut names = CertNames::default();
    for field in spec.split(|b| *b == 0).take(16) {
        let Some((kind, value)) = field.split_first() else {
            continue;
        };
        let text = std::str::from_utf8(value).ok()?.to_owned();
        let ia5 = || Ia5String::try_from(text.clone()).ok();
        match kind {
            b'U' => {
                params.subject_alt_names.push(SanType::URI(ia5()?));
                names.uris.push(text);
            }
            b'D' => {
                params.subject_alt_names.push(SanType::DnsName(ia5()?));
                names.dns.push(text);
            }
            b'E' => params.subject_alt_names.push(SanType::Rfc822Name(ia5()?)),
            b'I' => {
                let ip: [u8; 4] = value.get(..4)?.try_into().ok()?;
                params.subject_alt_names.push(SanType::IpAddress(ip.into()));
            }
            b'C' if names.cns.is_empty() => {
                params.distinguished_name.push(DnType::CommonName, text.as_str());
                names.cns.push(text);
            }
            b'c' if !names.cns.is_empty() && names.cns.len() < 2 => {
                // A second CN attribute, under the CN OID as a custom type.
                params
                    .distinguished_name
                    .push(DnType::CustomDnType(vec![2, 5, 4, 3]), text.as_str());
                names.cns.push(text);
            }
            _ => {}
        }
    }
    let cert = params.self_signed(key).ok()?;
    Some((cert.der().to_vec(), names))
}
