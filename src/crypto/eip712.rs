//! EIP-712 typed structured data (`eth_signTypedData_v4`): strict parsing, validation and hashing.
//!
//! A [`TypedData`] is built from a JSON document with the keys `types`, `primaryType`,
//! `domain` and `message`. Everything is validated and hashed while parsing, so the hash
//! getters cannot fail. The encoding follows EIP-712 as implemented by MetaMask's
//! eth-sig-util (v4), ethers' `TypedDataEncoder` and alloy's dyn-abi: `encodeType` with the
//! primary type first and its dependencies sorted by name, nested structs hashed
//! recursively, arrays (fixed, dynamic, nested, of any type) hashed as the keccak of the
//! concatenated element encodings, `bytes`/`string` hashed, atomic values as 32-byte words.
//!
//! Being used by a custodial signer, it is deliberately stricter than those libraries:
//! every field of a type must be present in the data and no field outside the type is
//! allowed (the signer never signs data that the user sees but the hash omits); values must
//! have the JSON type that matches their EIP-712 type; cyclic types are refused; type and
//! field names must be Solidity identifiers; and sizes are bounded.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use num_bigint::BigUint;
use num_traits::{One, Zero};
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value};
use sha3::{Digest, Keccak256};

/// Maximum nesting of structs and array dimensions below (and including) the primary type.
pub const MAX_DEPTH: usize = 16;
/// Maximum number of entries in `types` (including `EIP712Domain`).
pub const MAX_TYPES: usize = 128;
/// Maximum number of fields in one struct type.
pub const MAX_FIELDS_PER_TYPE: usize = 128;
/// Maximum length of any array, fixed or dynamic.
pub const MAX_ARRAY_LEN: usize = 4096;
/// Maximum size of a JSON document accepted by [`TypedData::from_slice`] / [`TypedData::from_json_str`].
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Maximum length of a type or field name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Maximum length of a field's type string (a name and its array brackets), in bytes.
pub const MAX_TYPE_STRING_BYTES: usize = 512;
/// Longest path segment shown in an error; longer keys are cut (the error names the place,
/// it need not echo a hostile key in full).
const MAX_SHOWN_SEGMENT: usize = 64;

const DOMAIN_TYPE: &str = "EIP712Domain";
/// Longest decimal text of a 256-bit magnitude (2^256 has 78 digits).
const MAX_DEC_DIGITS: usize = 78;
/// Longest hex text of a 256-bit magnitude.
const MAX_HEX_DIGITS: usize = 64;

/// Keccak-256 of `data`.
pub fn keccak256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Keccak256::digest(data));
    out
}

/// Why a typed-data document was refused. Every variant names the offending place in the
/// document with a dotted path (`message.from.wallet`, `types.Mail[1].type`,
/// `domain.chainId`, `primaryType`, `document` for the document as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[allow(missing_docs)] // every variant carries `path` (the field) and its own context, shown by Display
pub enum Eip712Error {
    /// The input is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("{path}: document is {size} bytes, the limit is {max}")]
    TooLarge { path: String, size: usize, max: usize },
    /// The input is not valid JSON.
    #[error("{path}: invalid JSON: {reason}")]
    InvalidJson { path: String, reason: String },
    /// A required key or field is absent.
    #[error("{path}: missing")]
    Missing { path: String },
    /// A key is present that the type (or the document format) does not define.
    #[error("{path}: unexpected field (not part of the type, so it would not be signed)")]
    UnexpectedField { path: String },
    /// A value has the wrong JSON type.
    #[error("{path}: expected {expected}")]
    WrongType { path: String, expected: &'static str },
    /// A value has the right JSON type but is malformed (bad hex, bad length, bad checksum...).
    #[error("{path}: {reason}")]
    InvalidValue { path: String, reason: String },
    /// A number does not fit its integer type.
    #[error("{path}: {reason}")]
    OutOfRange { path: String, reason: String },
    /// A type name or type string is malformed or not an EIP-712 type.
    #[error("{path}: invalid type: {reason}")]
    InvalidType { path: String, reason: String },
    /// A type string names a struct that `types` does not define.
    #[error("{path}: unknown type {name:?}")]
    UnknownType { path: String, name: String },
    /// A struct type defines the same field name twice.
    #[error("{path}: duplicate field name {name:?}")]
    DuplicateField { path: String, name: String },
    /// Struct types reference each other in a cycle.
    #[error("{path}: cyclic type reference: {cycle}")]
    CyclicType { path: String, cycle: String },
    /// A size or nesting limit is exceeded.
    #[error("{path}: limit exceeded: {reason}")]
    LimitExceeded { path: String, reason: String },
}

impl Eip712Error {
    /// The dotted path of the offending part of the document.
    pub fn path(&self) -> &str {
        match self {
            Eip712Error::TooLarge { path, .. }
            | Eip712Error::InvalidJson { path, .. }
            | Eip712Error::Missing { path }
            | Eip712Error::UnexpectedField { path }
            | Eip712Error::WrongType { path, .. }
            | Eip712Error::InvalidValue { path, .. }
            | Eip712Error::OutOfRange { path, .. }
            | Eip712Error::InvalidType { path, .. }
            | Eip712Error::UnknownType { path, .. }
            | Eip712Error::DuplicateField { path, .. }
            | Eip712Error::CyclicType { path, .. }
            | Eip712Error::LimitExceeded { path, .. } => path,
        }
    }
}

type Result<T> = std::result::Result<T, Eip712Error>;

/// A parsed EIP-712 type.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ty {
    Bool,
    Address,
    String,
    Bytes,
    /// `bytesN`, N in 1..=32.
    FixedBytes(usize),
    /// `uintN`, bits.
    Uint(usize),
    /// `intN`, bits.
    Int(usize),
    Struct(String),
    /// Element type and fixed length (`None` = dynamic).
    Array(Box<Ty>, Option<usize>),
}

impl Ty {
    /// The struct name at the bottom of (possibly nested) arrays, if any.
    fn struct_base(&self) -> Option<&str> {
        match self {
            Ty::Struct(name) => Some(name),
            Ty::Array(inner, _) => inner.struct_base(),
            _ => None,
        }
    }

    /// Number of array dimensions.
    fn dims(&self) -> usize {
        match self {
            Ty::Array(inner, _) => 1 + inner.dims(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Field {
    name: String,
    type_str: String,
    ty: Ty,
}

/// A validated and hashed `eth_signTypedData_v4` document.
#[derive(Debug, Clone)]
pub struct TypedData {
    types: Arc<TypeSet>,
    primary_type: String,
    message: Value,
    domain: Arc<Domain>,
    struct_hash: [u8; 32],
    signing_hash: [u8; 32],
}

impl TypedData {
    /// Parses, validates and hashes a JSON document given as bytes, in one
    /// pass over the text that also refuses a repeated key in any object.
    /// Input longer than [`MAX_DOCUMENT_BYTES`] is refused before parsing.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(Eip712Error::TooLarge {
                path: "document".into(),
                size: bytes.len(),
                max: MAX_DOCUMENT_BYTES,
            });
        }
        let fault = RefCell::new(None);
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let parsed = serde::de::DeserializeSeed::deserialize(Document { fault: &fault }, &mut de).and_then(|parts| {
            de.end()?;
            Ok(parts)
        });
        let parts = match (fault.into_inner(), parsed) {
            (Some(fault), _) => return Err(fault),
            (None, Ok(parts)) => parts,
            (None, Err(e)) => return Err(json_error(e)),
        };
        let types_raw = parts.types.ok_or_else(|| missing("types"))?;
        let types = TypeSet::of_text(types_raw.get())?;
        let domain = |types: &TypeSet| match parts.domain {
            None => Err(missing("domain")),
            Some(raw) => types.domain_of_text(raw.get()),
        };
        Self::from_parts(types, parts.primary_type, domain, parts.message)
    }

    /// Parses, validates and hashes a JSON document given as text.
    /// (Named `from_json_str` rather than `from_str` so as not to shadow [`std::str::FromStr`],
    /// which is implemented too.)
    pub fn from_json_str(s: &str) -> Result<Self> {
        Self::from_slice(s.as_bytes())
    }

    /// Validates and hashes an already parsed JSON document. Unlike [`TypedData::from_slice`],
    /// this cannot see duplicate object keys (the parser already kept only the last one). For exact integers the
    /// value should come from `serde_json` with the `arbitrary_precision` feature.
    pub fn from_value(v: &Value) -> Result<Self> {
        let doc = v.as_object().ok_or_else(|| Eip712Error::WrongType {
            path: "document".into(),
            expected: "a JSON object",
        })?;
        for key in doc.keys() {
            if !TOP_LEVEL.contains(&key.as_str()) {
                return Err(Eip712Error::UnexpectedField {
                    path: At::Key(&At::Doc, key).render(),
                });
            }
        }
        let types_v = doc.get("types").ok_or_else(|| missing("types"))?;
        let types = TypeSet::of_value(types_v)?;
        let domain = |types: &TypeSet| match doc.get("domain") {
            None => Err(missing("domain")),
            Some(v) => types.domain_of_value(v),
        };
        Self::from_parts(
            types,
            doc.get("primaryType").cloned(),
            domain,
            doc.get("message").cloned(),
        )
    }

    /// The rest of a document whose `types` are read: the primary type, the
    /// domain (read by `domain` once the primary type is known) and the
    /// message's hash, each checked against the types.
    fn from_parts(
        types: Arc<TypeSet>,
        primary_type: Option<Value>,
        domain: impl FnOnce(&TypeSet) -> Result<Arc<Domain>>,
        message: Option<Value>,
    ) -> Result<Self> {
        let primary_type = match primary_type {
            None => return Err(missing("primaryType")),
            Some(Value::String(s)) => s,
            Some(_) => return Err(wrong("primaryType", "a string")),
        };
        if primary_type == DOMAIN_TYPE {
            return Err(Eip712Error::InvalidType {
                path: "primaryType".into(),
                reason: "EIP712Domain cannot be the primary type".into(),
            });
        }
        if !types.fields.contains_key(&primary_type) {
            return Err(Eip712Error::UnknownType {
                path: "primaryType".into(),
                name: primary_type,
            });
        }
        let domain = domain(&types)?;
        let message = message.ok_or_else(|| missing("message"))?;
        let struct_hash = Encoder { types: &types }.hash_struct(&primary_type, &message, &At::Root("message"), 0)?;

        let mut pre = [0u8; 66];
        pre[0] = 0x19;
        pre[1] = 0x01;
        pre[2..34].copy_from_slice(&domain.separator);
        pre[34..].copy_from_slice(&struct_hash);
        let signing_hash = keccak256(&pre);
        Ok(TypedData {
            types,
            primary_type,
            message,
            domain,
            struct_hash,
            signing_hash,
        })
    }

    /// The document's `message`, as validated against the primary type.
    pub fn message(&self) -> &Value {
        &self.message
    }

    /// The `primaryType` of the document.
    pub fn primary_type(&self) -> &str {
        &self.primary_type
    }

    /// `hashStruct(EIP712Domain, domain)`.
    pub fn domain_separator(&self) -> [u8; 32] {
        self.domain.separator
    }

    /// `hashStruct(primaryType, message)`.
    pub fn struct_hash(&self) -> [u8; 32] {
        self.struct_hash
    }

    /// `keccak256(0x19 0x01 ‖ domainSeparator ‖ hashStruct(message))`: the digest to sign.
    pub fn signing_hash(&self) -> [u8; 32] {
        self.signing_hash
    }

    /// `domain.name`, if the domain type has a `string name` field.
    pub fn domain_name(&self) -> Option<&str> {
        self.domain.name.as_deref()
    }

    /// `domain.version`, if the domain type has a `string version` field.
    pub fn domain_version(&self) -> Option<&str> {
        self.domain.version.as_deref()
    }

    /// `domain.chainId` as a decimal string, if the domain type has an integer `chainId` field.
    pub fn domain_chain_id(&self) -> Option<String> {
        self.domain.chain_id.clone()
    }

    /// `domain.verifyingContract` as lowercase `0x` hex, if the domain type has an
    /// `address verifyingContract` field.
    pub fn domain_verifying_contract(&self) -> Option<String> {
        self.domain.verifying_contract.clone()
    }

    /// `encodeType` of a struct type defined in `types`.
    pub fn encode_type(&self, type_name: &str) -> Result<String> {
        match self.types.encoded.get(type_name) {
            Some((encoded, _)) => Ok(encoded.clone()),
            None => Err(Eip712Error::UnknownType {
                path: format!("types.{type_name}"),
                name: type_name.to_string(),
            }),
        }
    }
}

/// A message value of an integer type, as the document's validation read it
/// (JSON number, decimal string or `0x` hex string); `None` for a negative or
/// non-integer value.
pub fn uint_value(v: &Value) -> Option<BigUint> {
    match parse_integer(v, "value") {
        Ok((false, mag)) => Some(mag),
        Ok((true, mag)) if mag.is_zero() => Some(mag),
        _ => None,
    }
}

/// A message value of type `address`, as the document's validation read it.
pub fn address_value(v: &Value) -> Option<[u8; 20]> {
    parse_address(v, "value").ok()
}

impl std::str::FromStr for TypedData {
    type Err = Eip712Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::from_json_str(s)
    }
}

/// Where in the document a value sits: a chain of borrowed segments built while walking the
/// document and rendered to text only when an error names it, so that walking a document
/// costs time linear in its size whatever its keys' lengths and element counts.
#[derive(Debug, Clone, Copy)]
enum At<'a> {
    /// The whole document: shown as `document` alone, and not as a prefix of its children.
    Doc,
    /// A named top-level part (`domain`, `message`, `types`, ...).
    Root(&'static str),
    /// A field of an object.
    Key(&'a At<'a>, &'a str),
    /// An element of an array.
    Index(&'a At<'a>, usize),
}

#[cfg(test)]
thread_local! {
    /// Paths rendered on this thread (tests check that a valid document renders none).
    static RENDERED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl At<'_> {
    fn render(&self) -> String {
        #[cfg(test)]
        RENDERED.with(|n| n.set(n.get() + 1));
        let mut chain = Vec::new();
        let mut cur = Some(self);
        while let Some(at) = cur {
            chain.push(at);
            cur = match at {
                At::Key(parent, _) | At::Index(parent, _) => Some(*parent),
                At::Doc | At::Root(_) => None,
            };
        }
        let mut out = String::new();
        for at in chain.iter().rev() {
            match at {
                At::Doc => {}
                At::Root(name) => out.push_str(name),
                At::Key(_, key) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(shown(key));
                    if key.len() > MAX_SHOWN_SEGMENT {
                        out.push('…');
                    }
                }
                At::Index(_, i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        if out.is_empty() {
            out.push_str("document");
        }
        out
    }
}

/// At most [`MAX_SHOWN_SEGMENT`] bytes of `s`, cut at a character boundary.
fn shown(s: &str) -> &str {
    if s.len() <= MAX_SHOWN_SEGMENT {
        return s;
    }
    let mut end = MAX_SHOWN_SEGMENT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A place in the document as error text: a literal path, or an [`At`] rendered on demand.
trait Place {
    fn text(&self) -> String;
}

impl Place for str {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl Place for At<'_> {
    fn text(&self) -> String {
        self.render()
    }
}

fn missing(path: &(impl Place + ?Sized)) -> Eip712Error {
    Eip712Error::Missing { path: path.text() }
}

fn wrong(path: &(impl Place + ?Sized), expected: &'static str) -> Eip712Error {
    Eip712Error::WrongType {
        path: path.text(),
        expected,
    }
}

fn invalid(path: &(impl Place + ?Sized), reason: impl Into<String>) -> Eip712Error {
    Eip712Error::InvalidValue {
        path: path.text(),
        reason: reason.into(),
    }
}

fn out_of_range(path: &(impl Place + ?Sized), reason: impl Into<String>) -> Eip712Error {
    Eip712Error::OutOfRange {
        path: path.text(),
        reason: reason.into(),
    }
}

fn too_much(path: &(impl Place + ?Sized), reason: impl Into<String>) -> Eip712Error {
    Eip712Error::LimitExceeded {
        path: path.text(),
        reason: reason.into(),
    }
}

/// Refuses a name longer than `max` bytes before anything else looks at it.
fn check_len(path: &(impl Place + ?Sized), what: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(too_much(
            path,
            format!("{what} is {} bytes, the limit is {max}", value.len()),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// One pass over the text
// ---------------------------------------------------------------------------------------

/// The document's top-level keys.
const TOP_LEVEL: [&str; 4] = ["types", "primaryType", "domain", "message"];

/// The key under which `serde_json` (with `arbitrary_precision`) hands a
/// number to a visitor: a one-entry map holding the number's exact text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// A parse error from `serde_json`, for the document as a whole.
fn json_error(e: serde_json::Error) -> Eip712Error {
    Eip712Error::InvalidJson {
        path: "document".into(),
        reason: e.to_string(),
    }
}

/// The document's parts, read in one pass: `types` and `domain` as their
/// exact text (the keys of the caches of [`TypeSet`]), the rest as values.
struct Parts<'de> {
    types: Option<&'de RawValue>,
    primary_type: Option<Value>,
    domain: Option<&'de RawValue>,
    message: Option<Value>,
}

/// Reads the top level of a document. A fault the document itself has (not
/// an object, an unexpected or repeated key) is recorded in `fault` and
/// ends the parse.
struct Document<'a> {
    fault: &'a RefCell<Option<Eip712Error>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Document<'_> {
    type Value = Parts<'de>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Parts<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl Document<'_> {
    fn refuse<T, E: serde::de::Error>(&self, fault: Eip712Error) -> std::result::Result<T, E> {
        let shown = fault.to_string();
        *self.fault.borrow_mut() = Some(fault);
        Err(E::custom(shown))
    }

    fn not_an_object<T, E: serde::de::Error>(&self) -> std::result::Result<T, E> {
        self.refuse(wrong("document", "a JSON object"))
    }
}

impl<'de> serde::de::Visitor<'de> for Document<'_> {
    type Value = Parts<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> std::result::Result<Parts<'de>, E> {
        self.not_an_object()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> std::result::Result<Parts<'de>, E> {
        self.not_an_object()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> std::result::Result<Parts<'de>, E> {
        self.not_an_object()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> std::result::Result<Parts<'de>, E> {
        self.not_an_object()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> std::result::Result<Parts<'de>, E> {
        self.not_an_object()
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Parts<'de>, E> {
        self.not_an_object()
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> std::result::Result<Parts<'de>, A::Error> {
        self.not_an_object()
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Parts<'de>, A::Error> {
        let mut parts = Parts {
            types: None,
            primary_type: None,
            domain: None,
            message: None,
        };
        let mut first = true;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if first && key == NUMBER_TOKEN {
                return self.not_an_object();
            }
            first = false;
            let repeated = match key.as_ref() {
                "types" => parts.types.is_some(),
                "primaryType" => parts.primary_type.is_some(),
                "domain" => parts.domain.is_some(),
                "message" => parts.message.is_some(),
                _ => {
                    return self.refuse(Eip712Error::UnexpectedField {
                        path: At::Key(&At::Doc, &key).render(),
                    })
                }
            };
            if repeated {
                return self.refuse(duplicate_key(&At::Key(&At::Doc, &key)));
            }
            let strict = |root: &'static str| Strict {
                at: At::Root(root),
                fault: self.fault,
            };
            match key.as_ref() {
                "types" => parts.types = Some(map.next_value::<&'de RawValue>()?),
                "primaryType" => parts.primary_type = Some(map.next_value_seed(strict("primaryType"))?),
                "domain" => parts.domain = Some(map.next_value::<&'de RawValue>()?),
                _ => parts.message = Some(map.next_value_seed(strict("message"))?),
            }
        }
        Ok(parts)
    }
}

fn duplicate_key(at: &At<'_>) -> Eip712Error {
    Eip712Error::InvalidJson {
        path: at.render(),
        reason: "duplicate object key".into(),
    }
}

/// Builds a JSON value as `serde_json::Value` would, refusing a repeated
/// key in any object: `Value` silently keeps the last one, while a viewer
/// may show the first, so the signed data could differ from what the user
/// saw. The first repeated key is recorded in `fault` with its path.
struct Strict<'a> {
    at: At<'a>,
    fault: &'a RefCell<Option<Eip712Error>>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> std::result::Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> std::result::Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> std::result::Result<Value, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> std::result::Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let seed = Strict {
                at: At::Index(&self.at, out.len()),
                fault: self.fault,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.is_empty() && key == NUMBER_TOKEN {
                // A number's exact text, as `Value` itself reads it.
                let text: String = map.next_value()?;
                return text
                    .parse::<Number>()
                    .map(Value::Number)
                    .map_err(serde::de::Error::custom);
            }
            if out.contains_key(&key) {
                let fault = duplicate_key(&At::Key(&self.at, &key));
                let shown = fault.to_string();
                *self.fault.borrow_mut() = Some(fault);
                return Err(serde::de::Error::custom(shown));
            }
            let v = map.next_value_seed(Strict {
                at: At::Key(&self.at, &key),
                fault: self.fault,
            })?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Parses text with [`Strict`], starting at `at`.
fn strict_value(text: &str, at: At<'_>) -> Result<Value> {
    let fault = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = serde::de::DeserializeSeed::deserialize(Strict { at, fault: &fault }, &mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    match (fault.into_inner(), parsed) {
        (Some(fault), _) => Err(fault),
        (None, Ok(v)) => Ok(v),
        (None, Err(e)) => Err(json_error(e)),
    }
}

// ---------------------------------------------------------------------------------------
// Type sets, and the cache of those read
// ---------------------------------------------------------------------------------------

/// A document's `types`, validated: each struct's fields, and its
/// `encodeType` text with that text's hash (the type hash).
#[derive(Debug)]
struct TypeSet {
    fields: BTreeMap<String, Vec<Field>>,
    encoded: BTreeMap<String, (String, [u8; 32])>,
    /// Domains read against these types, keyed by their exact text.
    domains: Mutex<HashMap<Box<str>, Arc<Domain>>>,
}

/// A domain, validated against `EIP712Domain`: its separator, and what
/// policy reads of it.
#[derive(Debug)]
struct Domain {
    separator: [u8; 32],
    name: Option<String>,
    version: Option<String>,
    chain_id: Option<String>,
    verifying_contract: Option<String>,
}

/// Domains kept per type set (a signer signs for a few contracts), and the
/// longest domain text kept; as for types, a full cache is emptied.
const DOMAIN_CACHE_ENTRIES: usize = 64;
const DOMAIN_CACHE_MAX_TEXT: usize = 1024;

/// Takes a cache's lock; a panic while it was held left only a map behind.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `read()` through `cache` under `key`; errors are never kept.
fn cached<T>(
    cache: &Mutex<HashMap<Box<str>, Arc<T>>>,
    limits: (usize, usize),
    key: &str,
    read: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    let (entries, max_text) = limits;
    if key.len() > max_text {
        return read().map(Arc::new);
    }
    if let Some(hit) = lock(cache).get(key) {
        return Ok(hit.clone());
    }
    let value = Arc::new(read()?);
    let mut map = lock(cache);
    if map.len() >= entries {
        map.clear();
    }
    map.insert(key.into(), value.clone());
    Ok(value)
}

/// Type sets kept, keyed by their exact text: signers send the same few
/// documents' shapes again and again, and reading and hashing the types
/// is most of the work of a small document. Full: emptied, so that a
/// client sending ever new types costs itself the reading and nothing more.
const TYPE_CACHE_ENTRIES: usize = 256;
/// Longer `types` texts are read each time and not kept.
const TYPE_CACHE_MAX_TEXT: usize = 16 * 1024;

fn type_cache() -> &'static Mutex<HashMap<Box<str>, Arc<TypeSet>>> {
    static CACHE: OnceLock<Mutex<HashMap<Box<str>, Arc<TypeSet>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

#[cfg(test)]
thread_local! {
    /// Type sets read (not taken from the cache) on this thread.
    static TYPE_SETS_READ: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Domains read (not taken from a cache) on this thread.
    static DOMAINS_READ: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl TypeSet {
    fn read(v: &Value) -> Result<TypeSet> {
        #[cfg(test)]
        TYPE_SETS_READ.with(|n| n.set(n.get() + 1));
        let fields = parse_types(v)?;
        let encoded = check_graph_and_hash_types(&fields)?;
        Ok(TypeSet {
            fields,
            encoded,
            domains: Mutex::new(HashMap::new()),
        })
    }

    /// The set that `text` (the `types` member, as sent) defines.
    fn of_text(text: &str) -> Result<Arc<TypeSet>> {
        let limits = (TYPE_CACHE_ENTRIES, TYPE_CACHE_MAX_TEXT);
        cached(type_cache(), limits, text, || {
            Self::read(&strict_value(text, At::Root("types"))?)
        })
    }

    /// The set that an already parsed `types` value defines.
    fn of_value(v: &Value) -> Result<Arc<TypeSet>> {
        let limits = (TYPE_CACHE_ENTRIES, TYPE_CACHE_MAX_TEXT);
        cached(type_cache(), limits, &v.to_string(), || Self::read(v))
    }

    /// The domain that `text` (the `domain` member, as sent) holds.
    fn domain_of_text(&self, text: &str) -> Result<Arc<Domain>> {
        let limits = (DOMAIN_CACHE_ENTRIES, DOMAIN_CACHE_MAX_TEXT);
        cached(&self.domains, limits, text, || {
            self.read_domain(&strict_value(text, At::Root("domain"))?)
        })
    }

    /// The domain an already parsed `domain` value holds.
    fn domain_of_value(&self, v: &Value) -> Result<Arc<Domain>> {
        let limits = (DOMAIN_CACHE_ENTRIES, DOMAIN_CACHE_MAX_TEXT);
        cached(&self.domains, limits, &v.to_string(), || self.read_domain(v))
    }

    fn read_domain(&self, v: &Value) -> Result<Domain> {
        #[cfg(test)]
        DOMAINS_READ.with(|n| n.set(n.get() + 1));
        let separator = Encoder { types: self }.hash_struct(DOMAIN_TYPE, v, &At::Root("domain"), 0)?;
        // Summaries for display and policy; the values were validated above.
        let fields = self.fields.get(DOMAIN_TYPE).map(Vec::as_slice).unwrap_or(&[]);
        let field = |name: &str| -> Option<(&Ty, &Value)> {
            let f = fields.iter().find(|f| f.name == name)?;
            Some((&f.ty, v.get(name)?))
        };
        let string = |name: &str| match field(name) {
            Some((Ty::String, Value::String(s))) => Some(s.clone()),
            _ => None,
        };
        let chain_id = match field("chainId") {
            Some((Ty::Uint(_) | Ty::Int(_), v)) => parse_integer(v, "domain.chainId").ok().map(|(neg, mag)| {
                if neg && !mag.is_zero() {
                    format!("-{mag}")
                } else {
                    mag.to_string()
                }
            }),
            _ => None,
        };
        let verifying_contract = match field("verifyingContract") {
            Some((Ty::Address, v)) => parse_address(v, "domain.verifyingContract")
                .ok()
                .map(|a| format!("0x{}", hex::encode(a))),
            _ => None,
        };
        Ok(Domain {
            separator,
            name: string("name"),
            version: string("version"),
            chain_id,
            verifying_contract,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------

/// A Solidity identifier: `[A-Za-z_$][A-Za-z0-9_$]*`.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' || c == '$' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

/// `prefix` followed by a canonical decimal number (no sign, no leading zero).
fn numeric_suffix(s: &str, prefix: &str) -> Option<Option<usize>> {
    let rest = s.strip_prefix(prefix)?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if rest.starts_with('0') || rest.len() > 3 {
        return Some(None);
    }
    Some(rest.parse::<usize>().ok())
}

/// Names that are elementary Solidity types or reserved for them (so cannot be struct names).
fn is_reserved_type_name(s: &str) -> bool {
    matches!(
        s,
        "bool" | "address" | "string" | "bytes" | "byte" | "int" | "uint" | "fixed" | "ufixed" | "function"
    ) || ["int", "uint", "bytes", "fixed", "ufixed"].iter().any(|p| {
        s.strip_prefix(p)
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    })
}

/// Parses an atomic/dynamic base type name; `Ok(None)` for a would-be struct name.
fn parse_elementary(base: &str, path: &At<'_>) -> Result<Option<Ty>> {
    let bad = |reason: String| Eip712Error::InvalidType {
        path: path.render(),
        reason,
    };
    let ty = match base {
        "bool" => Ty::Bool,
        "address" => Ty::Address,
        "string" => Ty::String,
        "bytes" => Ty::Bytes,
        "int" | "uint" => return Err(bad(format!("{base:?} is not an EIP-712 type (write {base}256)"))),
        _ => {
            if let Some(n) = numeric_suffix(base, "uint") {
                match n {
                    Some(n) if n % 8 == 0 && (8..=256).contains(&n) => Ty::Uint(n),
                    _ => return Err(bad(format!("{base:?} is not a valid uint type"))),
                }
            } else if let Some(n) = numeric_suffix(base, "int") {
                match n {
                    Some(n) if n % 8 == 0 && (8..=256).contains(&n) => Ty::Int(n),
                    _ => return Err(bad(format!("{base:?} is not a valid int type"))),
                }
            } else if let Some(n) = numeric_suffix(base, "bytes") {
                match n {
                    Some(n) if (1..=32).contains(&n) => Ty::FixedBytes(n),
                    _ => return Err(bad(format!("{base:?} is not a valid bytes type"))),
                }
            } else if is_reserved_type_name(base) {
                return Err(bad(format!("{base:?} is not supported by EIP-712")));
            } else {
                return Ok(None);
            }
        }
    };
    Ok(Some(ty))
}

/// Parses a field type string such as `uint256`, `Person`, `Person[]`, `uint8[2][]`.
fn parse_type_str(s: &str, path: &At<'_>) -> Result<Ty> {
    check_len(path, "the type", s, MAX_TYPE_STRING_BYTES)?;
    let bad = |reason: String| Eip712Error::InvalidType {
        path: path.render(),
        reason,
    };
    let (base, suffix) = match s.find('[') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let mut ty = match parse_elementary(base, path)? {
        Some(t) => t,
        None => {
            if !is_identifier(base) {
                return Err(bad(format!("{s:?} is not a valid type name")));
            }
            Ty::Struct(base.to_string())
        }
    };
    let mut rest = suffix;
    while !rest.is_empty() {
        let inner_end = match (rest.strip_prefix('['), rest.find(']')) {
            (Some(_), Some(end)) => end,
            _ => return Err(bad(format!("{s:?} has malformed array brackets"))),
        };
        let len_txt = &rest[1..inner_end];
        let len = if len_txt.is_empty() {
            None
        } else {
            if !len_txt.bytes().all(|b| b.is_ascii_digit()) || len_txt.starts_with('0') {
                return Err(bad(format!("{s:?} has an invalid array length")));
            }
            match len_txt.parse::<usize>() {
                Ok(n) if n <= MAX_ARRAY_LEN => Some(n),
                _ => return Err(too_much(path, format!("array length in {s:?} exceeds {MAX_ARRAY_LEN}"))),
            }
        };
        ty = Ty::Array(Box::new(ty), len);
        if ty.dims() > MAX_DEPTH {
            return Err(too_much(path, format!("more than {MAX_DEPTH} array dimensions")));
        }
        rest = &rest[inner_end + 1..];
    }
    Ok(ty)
}

fn parse_types(v: &Value) -> Result<BTreeMap<String, Vec<Field>>> {
    let obj = v.as_object().ok_or_else(|| wrong("types", "an object"))?;
    if obj.len() > MAX_TYPES {
        return Err(too_much(
            "types",
            format!("{} types, the limit is {MAX_TYPES}", obj.len()),
        ));
    }
    let types_at = At::Root("types");
    let mut out = BTreeMap::new();
    for (name, fields_v) in obj {
        let tpath = At::Key(&types_at, name);
        check_len(&tpath, "the type name", name, MAX_NAME_BYTES)?;
        if !is_identifier(name) || is_reserved_type_name(name) {
            return Err(Eip712Error::InvalidType {
                path: tpath.render(),
                reason: format!("{name:?} is not a valid struct type name"),
            });
        }
        let arr = fields_v
            .as_array()
            .ok_or_else(|| wrong(&tpath, "an array of {name, type} objects"))?;
        if arr.len() > MAX_FIELDS_PER_TYPE {
            return Err(too_much(
                &tpath,
                format!("{} fields, the limit is {MAX_FIELDS_PER_TYPE}", arr.len()),
            ));
        }
        let mut fields: Vec<Field> = Vec::with_capacity(arr.len());
        let mut seen = BTreeSet::new();
        for (i, f) in arr.iter().enumerate() {
            let fpath = At::Index(&tpath, i);
            let fobj = f
                .as_object()
                .ok_or_else(|| wrong(&fpath, "an object with \"name\" and \"type\""))?;
            if let Some(key) = fobj.keys().find(|k| *k != "name" && *k != "type") {
                return Err(Eip712Error::UnexpectedField {
                    path: At::Key(&fpath, key).render(),
                });
            }
            let npath = At::Key(&fpath, "name");
            let fname = match fobj.get("name") {
                None => return Err(missing(&npath)),
                Some(Value::String(s)) => s,
                Some(_) => return Err(wrong(&npath, "a string")),
            };
            check_len(&npath, "the field name", fname, MAX_NAME_BYTES)?;
            if !is_identifier(fname) {
                return Err(invalid(&npath, format!("{fname:?} is not a valid field name")));
            }
            if !seen.insert(fname.as_str()) {
                return Err(Eip712Error::DuplicateField {
                    path: npath.render(),
                    name: fname.clone(),
                });
            }
            let typath = At::Key(&fpath, "type");
            let type_str = match fobj.get("type") {
                None => return Err(missing(&typath)),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(wrong(&typath, "a string")),
            };
            let ty = parse_type_str(&type_str, &typath)?;
            fields.push(Field {
                name: fname.clone(),
                type_str,
                ty,
            });
        }
        out.insert(name.clone(), fields);
    }
    if !out.contains_key(DOMAIN_TYPE) {
        return Err(missing("types.EIP712Domain"));
    }
    // Every referenced struct must be defined.
    for (name, fields) in &out {
        for (i, f) in fields.iter().enumerate() {
            if let Some(base) = f.ty.struct_base() {
                if !out.contains_key(base) {
                    return Err(Eip712Error::UnknownType {
                        path: format!("types.{name}[{i}].type"),
                        name: base.to_string(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Refuses cycles and too-deep nesting, then computes every struct's type hash.
fn check_graph_and_hash_types(types: &BTreeMap<String, Vec<Field>>) -> Result<BTreeMap<String, (String, [u8; 32])>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        InProgress,
        Done(usize),
    }

    // Iterative DFS (no recursion on untrusted input); depth(S) = 1 + max over fields of
    // (array dims + depth of the struct at the bottom, if any).
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    for root in types.keys() {
        if marks.contains_key(root.as_str()) {
            continue;
        }
        // Stack of (type name, next field index, depth so far).
        let mut stack: Vec<(&str, usize, usize)> = vec![(root.as_str(), 0, 1)];
        marks.insert(root.as_str(), Mark::InProgress);
        while let Some(top) = stack.last_mut() {
            let (name, idx, depth) = *top;
            let fields = types.get(name).map(Vec::as_slice).unwrap_or(&[]);
            if idx >= fields.len() {
                if depth > MAX_DEPTH {
                    return Err(Eip712Error::LimitExceeded {
                        path: format!("types.{name}"),
                        reason: format!("struct/array nesting deeper than {MAX_DEPTH}"),
                    });
                }
                marks.insert(name, Mark::Done(depth));
                stack.pop();
                if let Some(parent) = stack.last_mut() {
                    let dims = types
                        .get(parent.0)
                        .and_then(|f| f.get(parent.1))
                        .map_or(0, |f| f.ty.dims());
                    parent.2 = parent.2.max(1 + dims + depth);
                    parent.1 += 1;
                }
                continue;
            }
            let Some(field) = fields.get(idx) else {
                continue;
            };
            let dims = field.ty.dims();
            match field.ty.struct_base() {
                None => {
                    top.2 = depth.max(1 + dims);
                    top.1 += 1;
                }
                Some(child) => match marks.get(child) {
                    Some(Mark::Done(d)) => {
                        top.2 = depth.max(1 + dims + d);
                        top.1 += 1;
                    }
                    Some(Mark::InProgress) => {
                        let start = stack.iter().position(|(n, _, _)| *n == child).unwrap_or(0);
                        let mut cycle: Vec<&str> = stack[start..].iter().map(|e| e.0).collect();
                        cycle.push(child);
                        return Err(Eip712Error::CyclicType {
                            path: format!("types.{name}[{idx}].type"),
                            cycle: cycle.join(" -> "),
                        });
                    }
                    None => {
                        if let Some((child_key, _)) = types.get_key_value(child) {
                            marks.insert(child_key.as_str(), Mark::InProgress);
                            stack.push((child_key.as_str(), 0, 1));
                        } else {
                            return Err(Eip712Error::UnknownType {
                                path: format!("types.{name}[{idx}].type"),
                                name: child.to_string(),
                            });
                        }
                    }
                },
            }
        }
    }

    Ok(types
        .keys()
        .map(|name| {
            let encoded = encode_type_string(types, name);
            let hash = keccak256(encoded.as_bytes());
            (name.clone(), (encoded, hash))
        })
        .collect())
}

/// `encodeType`: the type itself, then all struct types it depends on, sorted by name.
/// Only called on acyclic, fully resolved type sets (cycles would still terminate).
fn encode_type_string(types: &BTreeMap<String, Vec<Field>>, primary: &str) -> String {
    let mut deps: BTreeSet<&str> = BTreeSet::new();
    let mut todo: Vec<&str> = vec![primary];
    while let Some(name) = todo.pop() {
        for f in types.get(name).map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(base) = f.ty.struct_base() {
                if base != primary && deps.insert(base) {
                    todo.push(base);
                }
            }
        }
    }
    let mut out = String::new();
    for name in std::iter::once(primary).chain(deps) {
        out.push_str(name);
        out.push('(');
        for (i, f) in types.get(name).map(Vec::as_slice).unwrap_or(&[]).iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&f.type_str);
            out.push(' ');
            out.push_str(&f.name);
        }
        out.push(')');
    }
    out
}

// ---------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------

struct Encoder<'a> {
    types: &'a TypeSet,
}

impl Encoder<'_> {
    /// `hashStruct(name, value)`; `depth` is the nesting level of the enclosing value.
    fn hash_struct(&self, name: &str, v: &Value, at: &At<'_>, depth: usize) -> Result<[u8; 32]> {
        if depth >= MAX_DEPTH {
            return Err(too_much(at, format!("struct/array nesting deeper than {MAX_DEPTH}")));
        }
        let (fields, typehash) = match (self.types.fields.get(name), self.types.encoded.get(name)) {
            (Some(f), Some((_, h))) => (f, h),
            _ => {
                return Err(Eip712Error::UnknownType {
                    path: at.render(),
                    name: name.into(),
                })
            }
        };
        let obj: &Map<String, Value> = v.as_object().ok_or_else(|| wrong(at, "an object"))?;
        if let Some(key) = obj.keys().find(|k| !fields.iter().any(|f| &f.name == *k)) {
            return Err(Eip712Error::UnexpectedField {
                path: At::Key(at, key).render(),
            });
        }
        let mut buf = Vec::with_capacity(32 * (fields.len() + 1));
        buf.extend_from_slice(typehash);
        for f in fields {
            let fat = At::Key(at, &f.name);
            let fv = obj.get(&f.name).ok_or_else(|| missing(&fat))?;
            buf.extend_from_slice(&self.encode_value(&f.ty, fv, &fat, depth + 1)?);
        }
        Ok(keccak256(&buf))
    }

    /// `encodeData` of one value: always one 32-byte word.
    fn encode_value(&self, ty: &Ty, v: &Value, path: &At<'_>, depth: usize) -> Result<[u8; 32]> {
        match ty {
            Ty::Struct(name) => self.hash_struct(name, v, path, depth),
            Ty::Array(inner, len) => {
                if depth >= MAX_DEPTH {
                    return Err(too_much(path, format!("struct/array nesting deeper than {MAX_DEPTH}")));
                }
                let arr = v.as_array().ok_or_else(|| wrong(path, "an array"))?;
                if arr.len() > MAX_ARRAY_LEN {
                    return Err(too_much(
                        path,
                        format!("{} elements, the limit is {MAX_ARRAY_LEN}", arr.len()),
                    ));
                }
                if let Some(n) = len {
                    if arr.len() != *n {
                        return Err(invalid(path, format!("expected {n} elements, got {}", arr.len())));
                    }
                }
                let mut buf = Vec::with_capacity(32 * arr.len());
                for (i, elem) in arr.iter().enumerate() {
                    buf.extend_from_slice(&self.encode_value(inner, elem, &At::Index(path, i), depth + 1)?);
                }
                Ok(keccak256(&buf))
            }
            Ty::String => match v {
                Value::String(s) => Ok(keccak256(s.as_bytes())),
                _ => Err(wrong(path, "a string")),
            },
            Ty::Bytes => Ok(keccak256(&parse_hex_bytes(v, path)?)),
            Ty::FixedBytes(n) => {
                let b = parse_hex_bytes(v, path)?;
                if b.len() != *n {
                    return Err(invalid(path, format!("expected {n} bytes, got {}", b.len())));
                }
                let mut word = [0u8; 32];
                word[..b.len()].copy_from_slice(&b);
                Ok(word)
            }
            Ty::Bool => match v {
                Value::Bool(b) => {
                    let mut word = [0u8; 32];
                    word[31] = u8::from(*b);
                    Ok(word)
                }
                _ => Err(wrong(path, "true or false")),
            },
            Ty::Address => {
                let a = parse_address(v, path)?;
                let mut word = [0u8; 32];
                word[12..].copy_from_slice(&a);
                Ok(word)
            }
            Ty::Uint(bits) => {
                let (neg, mag) = parse_integer(v, path)?;
                if neg && !mag.is_zero() {
                    return Err(out_of_range(path, format!("negative value for uint{bits}")));
                }
                if mag.bits() > *bits as u64 {
                    return Err(out_of_range(path, format!("value does not fit in uint{bits}")));
                }
                Ok(word_from_biguint(&mag))
            }
            Ty::Int(bits) => {
                let (neg, mag) = parse_integer(v, path)?;
                let limit = BigUint::one() << (*bits - 1);
                let fits = if neg { mag <= limit } else { mag < limit };
                if !fits {
                    return Err(out_of_range(path, format!("value does not fit in int{bits}")));
                }
                if neg && !mag.is_zero() {
                    let twos = (BigUint::one() << 256usize) - mag;
                    Ok(word_from_biguint(&twos))
                } else {
                    Ok(word_from_biguint(&mag))
                }
            }
        }
    }
}

/// Big-endian, left-padded to 32 bytes. The caller guarantees the value is below 2^256.
fn word_from_biguint(v: &BigUint) -> [u8; 32] {
    let bytes = v.to_bytes_be();
    let mut word = [0u8; 32];
    let n = bytes.len().min(32);
    word[32 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    word
}

/// Strict `0x`-prefixed hex (even length, may be empty after the prefix).
fn parse_hex_bytes(v: &Value, path: &(impl Place + ?Sized)) -> Result<Vec<u8>> {
    let s = v.as_str().ok_or_else(|| wrong(path, "a 0x-prefixed hex string"))?;
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| invalid(path, "hex string must start with 0x"))?;
    if digits.len() % 2 != 0 {
        return Err(invalid(path, "hex string has an odd number of digits"));
    }
    hex::decode(digits).map_err(|_| invalid(path, "invalid hex digit"))
}

/// A 20-byte address; mixed-case input must carry a valid EIP-55 checksum.
fn parse_address(v: &Value, path: &(impl Place + ?Sized)) -> Result<[u8; 20]> {
    let s = v.as_str().ok_or_else(|| wrong(path, "a 0x-prefixed address string"))?;
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| invalid(path, "address must start with 0x"))?;
    if digits.len() != 40 {
        return Err(invalid(
            path,
            format!("address must have 40 hex digits, got {}", digits.len()),
        ));
    }
    let mut out = [0u8; 20];
    hex::decode_to_slice(digits, &mut out).map_err(|_| invalid(path, "invalid hex digit"))?;
    let has_lower = digits.bytes().any(|b| b.is_ascii_lowercase());
    let has_upper = digits.bytes().any(|b| b.is_ascii_uppercase());
    if has_lower && has_upper && !eip55_ok(digits) {
        return Err(invalid(path, "bad EIP-55 address checksum"));
    }
    Ok(out)
}

fn eip55_ok(digits: &str) -> bool {
    let lower = digits.to_ascii_lowercase();
    let hash = keccak256(lower.as_bytes());
    digits.bytes().enumerate().all(|(i, c)| {
        if !c.is_ascii_alphabetic() {
            return true;
        }
        let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
        if nibble >= 8 {
            c.is_ascii_uppercase()
        } else {
            c.is_ascii_lowercase()
        }
    })
}

/// An integer as (negative, magnitude), from a JSON integer (exact text), a decimal string
/// or a `0x` hex string, each optionally with a leading `-`. Magnitudes above 256 bits are
/// refused here so no huge number is ever built.
fn parse_integer(v: &Value, path: &(impl Place + ?Sized)) -> Result<(bool, BigUint)> {
    let text: String = match v {
        Value::Number(n) => {
            let t = n.to_string();
            if t.contains(['.', 'e', 'E']) {
                return Err(wrong(path, "an integer (no fraction or exponent)"));
            }
            t
        }
        Value::String(s) => s.clone(),
        _ => return Err(wrong(path, "an integer, a decimal string or a 0x hex string")),
    };
    let (neg, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (radix, digits, max_digits) = match body.strip_prefix("0x") {
        Some(h) => (16, h, MAX_HEX_DIGITS),
        None => (10, body, MAX_DEC_DIGITS),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(path, format!("{text:?} is not an integer")));
    }
    if radix == 10 && !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(path, format!("{text:?} is not an integer")));
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > max_digits {
        return Err(out_of_range(path, "value does not fit in 256 bits"));
    }
    if significant.is_empty() {
        return Ok((neg, BigUint::zero()));
    }
    let mag = BigUint::parse_bytes(significant.as_bytes(), radix)
        .ok_or_else(|| invalid(path, format!("{text:?} is not an integer")))?;
    Ok((neg, mag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAIL_SPEC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/eip712/mail_spec.json"));

    /// Reference documents with their expected signing hash (see each file's "source").
    const FIXTURES: &[(&str, &str)] = &[
        (
            "ea_multi_no_fixed_len_array",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/ea_multi_no_fixed_len_array.json"
            )),
        ),
        (
            "ea_multi_array",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/ea_multi_array.json"
            )),
        ),
        (
            "ea_example_with_array",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/ea_example_with_array.json"
            )),
        ),
        (
            "ea_addresses_not_checksummed",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/ea_addresses_not_checksummed.json"
            )),
        ),
        (
            "ea_issue_201_with_array",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/ea_issue_201_with_array.json"
            )),
        ),
        (
            "sigutil_custom_array_type",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/sigutil_custom_array_type.json"
            )),
        ),
        (
            "sigutil_message_with_data",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/sigutil_message_with_data.json"
            )),
        ),
        (
            "sigutil_custom_data_type_empty_domain",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/sigutil_custom_data_type_empty_domain.json"
            )),
        ),
        (
            "alloy_seaport_nested_struct_array",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/alloy_seaport_nested_struct_array.json"
            )),
        ),
        (
            "own_ints_bytes_salt",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/own_ints_bytes_salt.json"
            )),
        ),
        (
            "own_numbers_as_strings",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/own_numbers_as_strings.json"
            )),
        ),
        (
            "own_fixed_nested_arrays",
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/data/eip712/own_fixed_nested_arrays.json"
            )),
        ),
    ];

    fn hex32(s: &str) -> [u8; 32] {
        let v = hex::decode(s.trim_start_matches("0x")).unwrap();
        v.try_into().unwrap()
    }

    fn mail_vector() -> Value {
        serde_json::from_str(MAIL_SPEC).unwrap()
    }

    /// The spec Mail document, to be mutated by the negative tests.
    fn mail() -> Value {
        mail_vector()["typedData"].clone()
    }

    fn fixture(name: &str) -> Value {
        let (_, text) = FIXTURES.iter().find(|(n, _)| *n == name).unwrap();
        let v: Value = serde_json::from_str(text).unwrap();
        v["typed_data"].clone()
    }

    fn err_path(doc: &Value) -> String {
        match TypedData::from_value(doc) {
            Ok(_) => panic!("accepted: {doc}"),
            Err(e) => {
                // Display always starts with the path.
                assert!(e.to_string().starts_with(e.path()), "{e}");
                e.path().to_string()
            }
        }
    }

    fn set(doc: &mut Value, pointer: &str, v: Value) {
        *doc.pointer_mut(pointer).unwrap() = v;
    }

    fn remove(doc: &mut Value, pointer: &str, key: &str) {
        doc.pointer_mut(pointer)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove(key)
            .unwrap();
    }

    #[test]
    fn mail_spec_vector() {
        let vector = mail_vector();
        let exp = &vector["expected"];
        let td = TypedData::from_json_str(&vector["typedData"].to_string()).unwrap();
        assert_eq!(td.primary_type(), "Mail");
        let enc = td.encode_type("Mail").unwrap();
        assert_eq!(enc, exp["encodeType_Mail"].as_str().unwrap());
        assert_eq!(keccak256(enc.as_bytes()), hex32(exp["typeHash_Mail"].as_str().unwrap()));
        assert_eq!(td.encode_type("Person").unwrap(), "Person(string name,address wallet)");
        assert_eq!(td.domain_separator(), hex32(exp["domainSeparator"].as_str().unwrap()));
        assert_eq!(td.struct_hash(), hex32(exp["structHash_Mail"].as_str().unwrap()));
        assert_eq!(td.signing_hash(), hex32(exp["digest"].as_str().unwrap()));
        assert_eq!(td.domain_name(), Some("Ether Mail"));
        assert_eq!(td.domain_version(), Some("1"));
        assert_eq!(td.domain_chain_id().as_deref(), Some("1"));
        assert_eq!(
            td.domain_verifying_contract().as_deref(),
            Some("0xcccccccccccccccccccccccccccccccccccccccc")
        );
        // from_slice and FromStr agree.
        let td2: TypedData = vector["typedData"].to_string().parse().unwrap();
        assert_eq!(td2.signing_hash(), td.signing_hash());
        let td3 = TypedData::from_slice(vector["typedData"].to_string().as_bytes()).unwrap();
        assert_eq!(td3.signing_hash(), td.signing_hash());
    }

    #[test]
    fn mail_spec_signature_and_recovery() {
        use k256::ecdsa::{SigningKey, VerifyingKey};
        let vector = mail_vector();
        let exp = &vector["expected"];
        let td = TypedData::from_value(&vector["typedData"]).unwrap();
        let digest = td.signing_hash();

        let key = keccak256(b"cow");
        assert!(exp["signer_private_key"].as_str().unwrap().ends_with(&hex::encode(key)));
        let sk = SigningKey::from_slice(&key).unwrap();
        let (sig, recid) = sk.sign_prehash_recoverable(&digest).unwrap();
        let mut rsv = sig.to_bytes().to_vec();
        rsv.push(27 + recid.to_byte());
        assert_eq!(
            format!("0x{}", hex::encode(&rsv)),
            exp["signature_rsv_65"].as_str().unwrap()
        );
        assert_eq!(u64::from(rsv[64]), exp["v"].as_u64().unwrap());

        let vk = VerifyingKey::recover_from_prehash(&digest, &sig, recid).unwrap();
        let point = vk.to_encoded_point(false);
        let addr = &keccak256(&point.as_bytes()[1..])[12..];
        assert_eq!(
            hex::encode(addr),
            exp["signer_address"]
                .as_str()
                .unwrap()
                .trim_start_matches("0x")
                .to_ascii_lowercase()
        );
    }

    #[test]
    fn reference_fixtures() {
        assert!(FIXTURES.len() >= 8);
        for (name, text) in FIXTURES {
            let fx: Value = serde_json::from_str(text).unwrap();
            let expected = hex32(fx["digest"].as_str().unwrap());
            let td = TypedData::from_value(&fx["typed_data"]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(td.signing_hash(), expected, "{name}");
            // Re-parsing from text gives the same hashes.
            let td2 = TypedData::from_json_str(&fx["typed_data"].to_string()).unwrap();
            assert_eq!(td2.signing_hash(), expected, "{name}");
            assert_eq!(td2.struct_hash(), td.struct_hash(), "{name}");
        }
    }

    #[test]
    fn fixture_details() {
        let td = TypedData::from_value(&fixture("own_ints_bytes_salt")).unwrap();
        assert_eq!(td.domain_name(), Some("Ints"));
        assert_eq!(td.domain_version(), None);
        assert_eq!(td.domain_chain_id().as_deref(), Some("137"));
        assert_eq!(td.domain_verifying_contract(), None);
        let td = TypedData::from_value(&fixture("own_numbers_as_strings")).unwrap();
        assert_eq!(td.domain_chain_id().as_deref(), Some("137"));
        let td = TypedData::from_value(&fixture("own_fixed_nested_arrays")).unwrap();
        assert_eq!(
            td.encode_type("Shape").unwrap(),
            "Shape(uint256[2][] grid,Point[2][2] corners,Point[] path,bytes32[] hashes,\
             bytes[] blobs,bool[3] flags,address[] owners)Point(int32 x,int32 y)"
        );
        assert_eq!(
            td.encode_type("EIP712Domain").unwrap(),
            "EIP712Domain(uint256 chainId,address verifyingContract)"
        );
        let td = TypedData::from_value(&fixture("ea_multi_no_fixed_len_array")).unwrap();
        assert_eq!(
            td.encode_type("Mail").unwrap(),
            "Mail(uint256[] ids,Person from,Person to,Person[] cc,Person[][] bcc,string contents,\
             string[][][] tags)Company(string name,uint256 id)\
             Person(string name,Company company,string[] aliases,address wallet)"
        );
        let err = td.encode_type("Nope").unwrap_err();
        assert_eq!(err.path(), "types.Nope");
    }

    #[test]
    fn negative_and_hex_numbers_encode_alike() {
        // -0x.. hex strings (accepted by ethers, refused by eth-account) and odd spellings.
        let base = fixture("own_ints_bytes_salt");
        let want = TypedData::from_value(&base).unwrap().signing_hash();
        for (field, v) in [
            ("i8min", json!("-0x80")),
            ("neg", json!("-0x01")),
            ("u8", json!("0x00ff")),
            ("u8", json!("000255")),
            ("i8max", json!("0x7F")),
        ] {
            let mut d = base.clone();
            set(&mut d, &format!("/message/{field}"), v.clone());
            let got = TypedData::from_value(&d).unwrap().signing_hash();
            assert_eq!(got, want, "{field} = {v}");
        }
    }

    // ---- one negative test per rejection class; each asserts the error's path ----

    #[test]
    fn rejects_unknown_type() {
        let mut d = mail();
        set(&mut d, "/types/Mail/1/type", json!("Persn"));
        assert_eq!(err_path(&d), "types.Mail[1].type");
        let mut d = mail();
        set(&mut d, "/types/Mail/1/type", json!("Persn[2]"));
        assert_eq!(err_path(&d), "types.Mail[1].type");
    }

    #[test]
    fn rejects_invalid_type_names() {
        let mut d = mail();
        let person = d["types"]["Person"].clone();
        d["types"]
            .as_object_mut()
            .unwrap()
            .insert("Per-son".into(), person.clone());
        assert_eq!(err_path(&d), "types.Per-son");
        let mut d = mail();
        d["types"].as_object_mut().unwrap().insert("uint256".into(), person);
        assert_eq!(err_path(&d), "types.uint256");
        for bad in [
            "uint 256",
            "Person ",
            "",
            "[]",
            "string[",
            "string[0]",
            "string[01]",
            "uint7",
            "uint264",
            "int0",
            "bytes0",
            "bytes33",
            "fixed128x18",
            "Person[]x",
        ] {
            let mut d = mail();
            set(&mut d, "/types/Mail/2/type", json!(bad));
            assert_eq!(err_path(&d), "types.Mail[2].type", "{bad:?}");
        }
        // Field names must be identifiers too.
        let mut d = mail();
        set(&mut d, "/types/Mail/2/name", json!("cont ents"));
        assert_eq!(err_path(&d), "types.Mail[2].name");
    }

    #[test]
    fn rejects_int_and_uint_without_size() {
        for bad in ["int", "uint", "int[]"] {
            let mut d = mail();
            set(&mut d, "/types/Mail/2/type", json!(bad));
            assert_eq!(err_path(&d), "types.Mail[2].type", "{bad}");
        }
    }

    #[test]
    fn rejects_duplicate_field_names() {
        let mut d = mail();
        set(&mut d, "/types/Person/1/name", json!("name"));
        assert_eq!(err_path(&d), "types.Person[1].name");
    }

    #[test]
    fn rejects_missing_fields() {
        let mut d = mail();
        remove(&mut d, "/message/from", "wallet");
        assert_eq!(err_path(&d), "message.from.wallet");
        let mut d = mail();
        remove(&mut d, "/domain", "chainId");
        assert_eq!(err_path(&d), "domain.chainId");
        let mut d = mail();
        remove(&mut d, "/types/Person/1", "type");
        assert_eq!(err_path(&d), "types.Person[1].type");
    }

    #[test]
    fn rejects_extra_fields() {
        let mut d = mail();
        d["message"]["from"]["nickname"] = json!("Moo");
        assert_eq!(err_path(&d), "message.from.nickname");
        let mut d = mail();
        d["domain"]["salt"] = json!(format!("0x{}", "00".repeat(32)));
        assert_eq!(err_path(&d), "domain.salt");
        let mut d = fixture("alloy_seaport_nested_struct_array");
        d["message"]["totalOriginalConsiderationItems"] = json!("2");
        assert_eq!(err_path(&d), "message.totalOriginalConsiderationItems");
        let mut d = mail();
        d["extra"] = json!(1);
        assert_eq!(err_path(&d), "extra");
        let mut d = mail();
        d["types"]["Person"][0]["indexed"] = json!(true);
        assert_eq!(err_path(&d), "types.Person[0].indexed");
    }

    #[test]
    fn rejects_wrong_json_types() {
        let mut d = mail();
        set(&mut d, "/message/contents", json!(5));
        let err = TypedData::from_value(&d).unwrap_err();
        assert_eq!(err.path(), "message.contents");
        assert_eq!(err.to_string(), "message.contents: expected a string");
        let mut d = mail();
        set(&mut d, "/message/to", json!("Bob"));
        assert_eq!(err_path(&d), "message.to");
        let mut d = mail();
        set(&mut d, "/message/from/wallet", json!(null));
        assert_eq!(err_path(&d), "message.from.wallet");
        let mut d = mail();
        set(&mut d, "/domain/chainId", json!(true));
        assert_eq!(err_path(&d), "domain.chainId");
        let mut d = mail();
        set(&mut d, "/domain/chainId", json!(1.5));
        assert_eq!(err_path(&d), "domain.chainId");
        let d: Value = serde_json::from_str(&MAIL_SPEC.replace("\"chainId\": 1,", "\"chainId\": 1e0,")).unwrap();
        assert_eq!(err_path(&d["typedData"]), "domain.chainId");
        let mut d = fixture("own_ints_bytes_salt");
        set(&mut d, "/message/flag", json!("true"));
        assert_eq!(err_path(&d), "message.flag");
        let mut d = fixture("own_ints_bytes_salt");
        set(&mut d, "/message/flag", json!(1));
        assert_eq!(err_path(&d), "message.flag");
        let mut d = fixture("own_fixed_nested_arrays");
        set(&mut d, "/message/grid/1", json!(3));
        assert_eq!(err_path(&d), "message.grid[1]");
        let mut d = mail();
        set(&mut d, "/primaryType", json!(1));
        assert_eq!(err_path(&d), "primaryType");
        let mut d = mail();
        set(&mut d, "/types", json!([]));
        assert_eq!(err_path(&d), "types");
        let mut d = mail();
        set(&mut d, "/domain", json!("x"));
        assert_eq!(err_path(&d), "domain");
    }

    #[test]
    fn rejects_out_of_range_integers() {
        for (field, v) in [
            ("u8", json!(256)),
            ("u8", json!(-1)),
            ("u8", json!("256")),
            ("u8", json!("0x100")),
            ("u8", json!("-0x1")),
            ("i8max", json!(128)),
            ("i8min", json!(-129)),
            (
                "i256min",
                json!("-0x8000000000000000000000000000000000000000000000000000000000000001"),
            ),
            (
                "u256max",
                json!("0x10000000000000000000000000000000000000000000000000000000000000000"),
            ),
            (
                "u256max",
                json!("115792089237316195423570985008687907853269984665640564039457584007913129639936"),
            ),
            ("u256max", json!("9".repeat(200_000))),
        ] {
            let mut d = fixture("own_ints_bytes_salt");
            set(&mut d, &format!("/message/{field}"), v.clone());
            let err = TypedData::from_value(&d).unwrap_err();
            assert_eq!(err.path(), format!("message.{field}"), "{v}");
            assert!(matches!(err, Eip712Error::OutOfRange { .. }), "{v}: {err}");
        }
        for v in [
            json!(""),
            json!("0x"),
            json!("1_000"),
            json!(" 1"),
            json!("+1"),
            json!("0xg"),
            json!("1a"),
        ] {
            let mut d = fixture("own_ints_bytes_salt");
            set(&mut d, "/message/u8", v.clone());
            assert_eq!(err_path(&d), "message.u8", "{v}");
        }
        let mut d = mail();
        set(&mut d, "/domain/chainId", json!(-1));
        assert_eq!(err_path(&d), "domain.chainId");
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD82",   // 39 digits
            "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD8266", // 41 digits
            "CD2a3d9F938E13CD947Ec05AbC7FE734Df8DD82600",  // no 0x
            "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD82g",  // bad hex
            "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8Dd826",  // bad checksum
            "0x",
        ] {
            let mut d = mail();
            set(&mut d, "/message/from/wallet", json!(bad));
            assert_eq!(err_path(&d), "message.from.wallet", "{bad}");
        }
        // The upstream eth-sig-util/alloy document has a mixed-case address with a bad checksum.
        let mut d = fixture("sigutil_custom_array_type");
        set(
            &mut d,
            "/message/from/wallet/1",
            json!("0xDD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"),
        );
        assert_eq!(err_path(&d), "message.from.wallet[1]");
        let mut d = mail();
        set(
            &mut d,
            "/domain/verifyingContract",
            json!("0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccc"),
        );
        assert_eq!(err_path(&d), "domain.verifyingContract");
        // All-upper and all-lower are accepted without checksum.
        let mut d = mail();
        set(
            &mut d,
            "/message/from/wallet",
            json!("0xCD2A3D9F938E13CD947EC05ABC7FE734DF8DD826"),
        );
        let td = TypedData::from_value(&d).unwrap();
        assert_eq!(
            td.signing_hash(),
            TypedData::from_value(&mail()).unwrap().signing_hash()
        );
    }

    #[test]
    fn rejects_bad_bytes() {
        for (field, bad) in [
            ("b1", "0x"),
            ("b1", "0x0102"),
            ("b32", "0x00"),
            ("b5", "0x01020304"),
            ("b5", "0x010203040"),
            ("data", "0x0"),
            ("data", "deadbeef"),
            ("data", "0xzz"),
        ] {
            let mut d = fixture("own_ints_bytes_salt");
            set(&mut d, &format!("/message/{field}"), json!(bad));
            assert_eq!(err_path(&d), format!("message.{field}"), "{bad}");
        }
        let mut d = fixture("own_ints_bytes_salt");
        set(&mut d, "/domain/salt", json!("0x01"));
        assert_eq!(err_path(&d), "domain.salt");
    }

    #[test]
    fn rejects_fixed_array_wrong_length() {
        let mut d = fixture("own_fixed_nested_arrays");
        set(&mut d, "/message/flags", json!([true, false]));
        assert_eq!(err_path(&d), "message.flags");
        let mut d = fixture("own_fixed_nested_arrays");
        set(&mut d, "/message/grid/2", json!([5, 6, 7]));
        assert_eq!(err_path(&d), "message.grid[2]");
        let mut d = fixture("own_fixed_nested_arrays");
        set(&mut d, "/message/corners/1", json!([{"x": 1, "y": 1}]));
        assert_eq!(err_path(&d), "message.corners[1]");
        let mut d = fixture("own_fixed_nested_arrays");
        set(&mut d, "/message/corners/1/0/y", json!("x"));
        assert_eq!(err_path(&d), "message.corners[1][0].y");
    }

    #[test]
    fn rejects_bad_primary_type() {
        let mut d = mail();
        remove(&mut d, "", "primaryType");
        assert_eq!(err_path(&d), "primaryType");
        let mut d = mail();
        set(&mut d, "/primaryType", json!("Letter"));
        assert_eq!(err_path(&d), "primaryType");
        let mut d = mail();
        set(&mut d, "/primaryType", json!("EIP712Domain"));
        assert_eq!(err_path(&d), "primaryType");
        let mut d = mail();
        set(&mut d, "/primaryType", json!("Mail[]"));
        assert_eq!(err_path(&d), "primaryType");
    }

    #[test]
    fn rejects_missing_document_parts() {
        for key in ["types", "domain", "message"] {
            let mut d = mail();
            remove(&mut d, "", key);
            assert_eq!(err_path(&d), key);
        }
        let mut d = mail();
        remove(&mut d, "/types", "EIP712Domain");
        assert_eq!(err_path(&d), "types.EIP712Domain");
    }

    #[test]
    fn rejects_cyclic_types() {
        // Direct.
        let mut d = mail();
        d["types"]["Mail"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "replyTo", "type": "Mail"}));
        let err = TypedData::from_value(&d).unwrap_err();
        assert!(matches!(err, Eip712Error::CyclicType { .. }), "{err}");
        assert_eq!(err.path(), "types.Mail[3].type");
        // Indirect, through an array.
        let mut d = mail();
        d["types"]["Person"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "inbox", "type": "Mail[]"}));
        let err = TypedData::from_value(&d).unwrap_err();
        assert!(matches!(err, Eip712Error::CyclicType { .. }), "{err}");
        assert_eq!(err.path(), "types.Person[2].type");
        // In an unused type, through a fixed nested array.
        let mut d = mail();
        d["types"]["A"] = json!([{"name": "b", "type": "B[2][]"}]);
        d["types"]["B"] = json!([{"name": "a", "type": "A"}]);
        let err = TypedData::from_value(&d).unwrap_err();
        assert!(matches!(err, Eip712Error::CyclicType { .. }), "{err}");
        assert_eq!(err.path(), "types.B[0].type");
    }

    fn chain_doc(levels: usize) -> Value {
        // T0 { T1 next }, ..., T{n-1} { uint8 v }: `levels` nested structs.
        let mut types = serde_json::Map::new();
        types.insert("EIP712Domain".into(), json!([]));
        for i in 0..levels {
            let fields = if i + 1 < levels {
                json!([{"name": "next", "type": format!("T{}", i + 1)}])
            } else {
                json!([{"name": "v", "type": "uint8"}])
            };
            types.insert(format!("T{i}"), fields);
        }
        let mut message = json!({"v": 1});
        for _ in 1..levels {
            message = json!({ "next": message });
        }
        json!({"types": types, "primaryType": "T0", "domain": {}, "message": message})
    }

    /// A document whose values carry many elements and long keys parses without building
    /// one path string: paths are rendered only for the error that names one.
    #[test]
    fn valid_documents_render_no_path() {
        let long = "f".repeat(MAX_NAME_BYTES);
        let d = json!({
            "types": {
                "EIP712Domain": [{"name": "name", "type": "string"}],
                "Bag": [{"name": long, "type": "uint8[]"}, {"name": "nested", "type": "bytes1[][]"}],
            },
            "primaryType": "Bag",
            "domain": {"name": "x"},
            "message": {"nested": vec![vec!["0x01"; 64]; 64]},
        });
        let mut d = d;
        d["message"][long.as_str()] = json!(vec![7; MAX_ARRAY_LEN]);
        let text = d.to_string();
        RENDERED.with(|n| n.set(0));
        TypedData::from_json_str(&text).expect("valid");
        assert_eq!(RENDERED.with(std::cell::Cell::get), 0);
        // The failing element's path is still exact.
        let mut bad = d.clone();
        bad["message"]["nested"][63][62] = json!("0x0102");
        let err = TypedData::from_json_str(&bad.to_string()).unwrap_err();
        assert_eq!(err.path(), "message.nested[63][62]");
        assert_eq!(RENDERED.with(std::cell::Cell::get), 1);
    }

    /// Names are bounded before anything else reads them, and a hostile key is cut short
    /// in the error that names it.
    #[test]
    fn long_names_are_refused_and_cut_short_in_errors() {
        let long = "a".repeat(64 * 1024);
        let mut d = mail();
        set(&mut d, "/types/Mail/0/name", json!(long));
        let err = TypedData::from_value(&d).unwrap_err();
        assert!(matches!(err, Eip712Error::LimitExceeded { .. }), "{err}");
        assert_eq!(err.path(), "types.Mail[0].name");
        assert!(err.to_string().len() < 200, "{err}");

        let mut d = mail();
        set(
            &mut d,
            "/types/Mail/2/type",
            json!(format!("Person{}", "[]".repeat(300))),
        );
        let err = TypedData::from_value(&d).unwrap_err();
        assert!(matches!(err, Eip712Error::LimitExceeded { .. }), "{err}");

        let mut d = mail();
        let types = d["types"].as_object_mut().expect("types");
        types.insert(long.clone(), json!([]));
        let err = TypedData::from_value(&d).unwrap_err();
        assert!(matches!(err, Eip712Error::LimitExceeded { .. }), "{err}");
        assert_eq!(err.path(), format!("types.{}…", &long[..MAX_SHOWN_SEGMENT]));

        // An unexpected message key is named, but not echoed in full.
        let mut d = mail();
        d["message"][long.as_str()] = json!(1);
        let err = TypedData::from_value(&d).unwrap_err();
        assert!(matches!(err, Eip712Error::UnexpectedField { .. }), "{err}");
        assert_eq!(err.path(), format!("message.{}…", &long[..MAX_SHOWN_SEGMENT]));
    }

    #[test]
    fn depth_limit() {
        assert!(TypedData::from_value(&chain_doc(MAX_DEPTH)).is_ok());
        let err = TypedData::from_value(&chain_doc(MAX_DEPTH + 1)).unwrap_err();
        assert!(matches!(err, Eip712Error::LimitExceeded { .. }), "{err}");
        assert_eq!(err.path(), "types.T0");
        // Array dimensions count too.
        let mut d = mail();
        set(
            &mut d,
            "/types/Mail/2/type",
            json!(format!("string{}", "[]".repeat(MAX_DEPTH))),
        );
        assert_eq!(err_path(&d), "types.Mail");
        set(
            &mut d,
            "/types/Mail/2/type",
            json!(format!("string{}", "[]".repeat(MAX_DEPTH + 1))),
        );
        assert_eq!(err_path(&d), "types.Mail[2].type");
    }

    #[test]
    fn size_limits() {
        // Too many types.
        let mut d = mail();
        for i in 0..MAX_TYPES {
            d["types"][format!("X{i}")] = json!([]);
        }
        assert_eq!(err_path(&d), "types");
        // Too many fields.
        let mut d = mail();
        let fields: Vec<Value> = (0..=MAX_FIELDS_PER_TYPE)
            .map(|i| json!({"name": format!("f{i}"), "type": "bool"}))
            .collect();
        d["types"]["Big"] = Value::Array(fields);
        assert_eq!(err_path(&d), "types.Big");
        // Too long an array value.
        let mut d = fixture("own_fixed_nested_arrays");
        set(
            &mut d,
            "/message/owners",
            Value::Array(vec![
                json!("0x1111111111111111111111111111111111111111");
                MAX_ARRAY_LEN + 1
            ]),
        );
        assert_eq!(err_path(&d), "message.owners");
        // Too long a fixed array type.
        let mut d = mail();
        set(
            &mut d,
            "/types/Mail/2/type",
            json!(format!("string[{}]", MAX_ARRAY_LEN + 1)),
        );
        assert_eq!(err_path(&d), "types.Mail[2].type");
    }

    #[test]
    fn huge_document_refused_before_parsing() {
        let big = vec![b'['; 10 * 1024 * 1024];
        let start = std::time::Instant::now();
        let err = TypedData::from_slice(&big).unwrap_err();
        assert!(start.elapsed() < std::time::Duration::from_millis(50));
        assert!(matches!(err, Eip712Error::TooLarge { .. }), "{err}");
        assert_eq!(err.path(), "document");
        let s = " ".repeat(MAX_DOCUMENT_BYTES + 1);
        assert_eq!(TypedData::from_json_str(&s).unwrap_err().path(), "document");
    }

    #[test]
    fn rejects_non_object_and_invalid_json() {
        for text in ["[]", "5", "\"x\"", "null"] {
            let err = TypedData::from_json_str(text).unwrap_err();
            assert_eq!(err.path(), "document", "{text}");
        }
        for text in ["", "{", "{\"types\":}", "\u{feff}{}", "{} x"] {
            let err = TypedData::from_json_str(text).unwrap_err();
            assert!(matches!(err, Eip712Error::InvalidJson { .. }), "{text}");
            assert_eq!(err.path(), "document", "{text}");
        }
        // Deep JSON nesting is an error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(TypedData::from_json_str(&deep).unwrap_err().path(), "document");
    }

    #[test]
    fn rejects_duplicate_keys() {
        let text = mail().to_string();
        let dup = text.replacen(
            "\"contents\":\"Hello, Bob!\"",
            "\"contents\":\"Hello, Bob!\",\"contents\":\"Pay Eve\"",
            1,
        );
        assert_ne!(dup, text);
        let err = TypedData::from_json_str(&dup).unwrap_err();
        assert_eq!(err.path(), "message.contents");
        let dup = text.replacen("\"name\":\"Bob\"", "\"name\":\"Bob\",\"name\":\"Eve\"", 1);
        assert_ne!(dup, text);
        assert_eq!(TypedData::from_json_str(&dup).unwrap_err().path(), "message.to.name");
        let dup = text.replacen("{\"name\":\"name\"", "{\"name\":\"x\",\"name\":\"name\"", 1);
        assert_ne!(dup, text);
        assert!(TypedData::from_json_str(&dup).unwrap_err().path().starts_with("types."));
        let dup = format!("{{\"message\":{{}},{}", &text[1..]);
        assert_eq!(TypedData::from_json_str(&dup).unwrap_err().path(), "message");
    }

    /// `types` is read and hashed once per distinct text: a second document
    /// with the same types reuses the set, still checks its own message
    /// against it, and hashes to what the types themselves give.
    #[test]
    fn types_are_read_once_per_text() {
        // A type name no other test uses: the process-wide cache starts without it.
        let name = format!("T{}", uuid::Uuid::new_v4().simple());
        let doc = |message: Value| {
            let mut types = Map::new();
            types.insert(DOMAIN_TYPE.into(), json!([{"name": "name", "type": "string"}]));
            types.insert(name.clone(), json!([{"name": "n", "type": "uint64"}]));
            json!({"types": types, "primaryType": name, "domain": {"name": "x"}, "message": message}).to_string()
        };
        TYPE_SETS_READ.with(|n| n.set(0));
        DOMAINS_READ.with(|n| n.set(0));
        let one = TypedData::from_json_str(&doc(json!({"n": 1}))).expect("valid");
        let two = TypedData::from_json_str(&doc(json!({"n": 2}))).expect("valid");
        assert_eq!(TYPE_SETS_READ.with(std::cell::Cell::get), 1);
        assert_eq!(DOMAINS_READ.with(std::cell::Cell::get), 1);
        // Another domain is read against the same types; a kept one gives what
        // reading it gives.
        let other = doc(json!({"n": 1})).replace(r#""domain":{"name":"x"}"#, r#""domain":{"name":"y"}"#);
        let other = TypedData::from_json_str(&other).expect("valid");
        assert_eq!(DOMAINS_READ.with(std::cell::Cell::get), 2);
        assert_eq!(other.domain_name(), Some("y"));
        assert_eq!(one.domain_name(), Some("x"));
        let separator = |name: &str| {
            let mut pre = keccak256(b"EIP712Domain(string name)").to_vec();
            pre.extend_from_slice(&keccak256(name.as_bytes()));
            keccak256(&pre)
        };
        assert_eq!(one.domain_separator(), separator("x"));
        assert_eq!(two.domain_separator(), separator("x"));
        assert_eq!(other.domain_separator(), separator("y"));
        for (bad, path) in [
            (r#""domain":{"name":1}"#, "domain.name"),
            (r#""domain":{"name":"x","name":"y"}"#, "domain.name"),
            (r#""domain":{"name":"x","chainId":1}"#, "domain.chainId"),
        ] {
            let text = doc(json!({"n": 1})).replace(r#""domain":{"name":"x"}"#, bad);
            assert_eq!(TypedData::from_json_str(&text).unwrap_err().path(), path, "{bad}");
        }
        let typehash = keccak256(format!("{name}(uint64 n)").as_bytes());
        for (typed, n) in [(&one, 1u8), (&two, 2u8)] {
            let mut pre = typehash.to_vec();
            let mut word = [0u8; 32];
            word[31] = n;
            pre.extend_from_slice(&word);
            assert_eq!(typed.struct_hash(), keccak256(&pre));
        }
        // The message is checked against the kept set.
        let err = TypedData::from_json_str(&doc(json!({"n": "x"}))).unwrap_err();
        assert_eq!(err.path(), "message.n");
        let err = TypedData::from_json_str(&doc(json!({"n": 1, "m": 2}))).unwrap_err();
        assert_eq!(
            err,
            Eip712Error::UnexpectedField {
                path: "message.m".into()
            }
        );
        assert_eq!(TYPE_SETS_READ.with(std::cell::Cell::get), 1);
        // A refused set is never kept: read again each time.
        let bad = doc(json!({"n": 1})).replace("uint64", "uint65");
        for _ in 0..2 {
            assert_eq!(
                TypedData::from_json_str(&bad).unwrap_err().path(),
                format!("types.{name}[0].type")
            );
        }
        assert_eq!(TYPE_SETS_READ.with(std::cell::Cell::get), 3);
    }

    /// The cache stays bounded whatever number of distinct types it sees.
    #[test]
    fn the_type_cache_is_bounded() {
        for i in 0..(TYPE_CACHE_ENTRIES + 10) {
            let text = format!(
                r#"{{"types":{{"EIP712Domain":[],"B{i}":[{{"name":"n","type":"uint8"}}]}},"primaryType":"B{i}","domain":{{}},"message":{{"n":{}}}}}"#,
                i % 256
            );
            TypedData::from_json_str(&text).expect("valid");
            assert!(type_cache().lock().map(|c| c.len()).unwrap_or(0) <= TYPE_CACHE_ENTRIES);
        }
    }

    /// The one-pass reader reads what `serde_json::Value` reads, numbers'
    /// exact text included, and refuses a top level that is not an object.
    #[test]
    fn the_one_pass_reader_agrees_with_value() {
        for (name, text) in FIXTURES {
            let v: Value = serde_json::from_str(text).expect(name);
            let doc = v.get("typed_data").unwrap_or(&v);
            let typed = TypedData::from_json_str(&doc.to_string()).expect(name);
            assert_eq!(Some(typed.message()), doc.get("message"), "{name}");
        }
        let big = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
        let text = format!(
            r#"{{"types":{{"EIP712Domain":[],"N":[{{"name":"u","type":"uint256"}}]}},"primaryType":"N","domain":{{}},"message":{{"u":{big}}}}}"#
        );
        let typed = TypedData::from_json_str(&text).expect("valid");
        assert_eq!(typed.message()["u"].to_string(), big);
        let quoted = text.replace(big, &format!("\"{big}\""));
        assert_eq!(
            TypedData::from_json_str(&quoted).expect("valid").struct_hash(),
            typed.struct_hash()
        );
        for top in [
            "1",
            "\"x\"",
            "[]",
            "null",
            "true",
            r#"{"$serde_json::private::Number":"1"}"#,
        ] {
            let err = TypedData::from_json_str(top).unwrap_err();
            assert_eq!(err.path(), "document", "{top}");
        }
        assert_eq!(
            TypedData::from_json_str(&format!("{text} x")).unwrap_err().path(),
            "document"
        );
    }

    /// Tiny deterministic PRNG for the property tests (no extra dev-dependency).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 ^ (self.0 >> 29)
        }
    }

    #[test]
    fn property_number_spellings_agree() {
        let mut rng = Lcg(42);
        let mk = |v: Value, w: Value| {
            json!({
                "types": {"EIP712Domain": [], "N": [{"name": "u", "type": "uint64"}, {"name": "i", "type": "int64"}]},
                "primaryType": "N", "domain": {}, "message": {"u": v, "i": w}
            })
        };
        for _ in 0..200 {
            let u = rng.next();
            let i = rng.next() as i64;
            let a = TypedData::from_value(&mk(json!(u), json!(i))).unwrap();
            let b = TypedData::from_value(&mk(json!(u.to_string()), json!(i.to_string()))).unwrap();
            let ih = if i < 0 {
                format!("-0x{:x}", i.unsigned_abs())
            } else {
                format!("0x{i:x}")
            };
            let c = TypedData::from_value(&mk(json!(format!("0x{u:x}")), json!(ih))).unwrap();
            assert_eq!(a.struct_hash(), b.struct_hash());
            assert_eq!(a.struct_hash(), c.struct_hash());
            // Direct check of the encoding: keccak(typehash ‖ u ‖ two's complement i).
            let mut buf = keccak256(b"N(uint64 u,int64 i)").to_vec();
            let mut w = [0u8; 32];
            w[24..].copy_from_slice(&u.to_be_bytes());
            buf.extend_from_slice(&w);
            let mut w = if i < 0 { [0xffu8; 32] } else { [0u8; 32] };
            w[24..].copy_from_slice(&i.to_be_bytes());
            buf.extend_from_slice(&w);
            assert_eq!(a.struct_hash(), keccak256(&buf));
        }
    }

    #[test]
    fn property_mutated_documents_never_panic() {
        let mut rng = Lcg(7);
        let base: Vec<u8> = mail().to_string().into_bytes();
        let alphabet = b"{}[]\",:0123456789abcdefxX-. \\uEIPtrueflsn";
        let mut accepted = 0;
        for _ in 0..3000 {
            let mut doc = base.clone();
            for _ in 0..(1 + rng.next() % 4) {
                let pos = (rng.next() as usize) % doc.len();
                match rng.next() % 3 {
                    0 => doc[pos] = alphabet[(rng.next() as usize) % alphabet.len()],
                    1 => {
                        doc.remove(pos);
                    }
                    _ => doc.insert(pos, alphabet[(rng.next() as usize) % alphabet.len()]),
                }
            }
            if let Ok(td) = TypedData::from_slice(&doc) {
                accepted += 1;
                let _ = td.signing_hash();
            }
        }
        assert!(accepted < 3000);
    }
}
