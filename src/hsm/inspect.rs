//! Listing of key objects (for tests and audits): no key material, only attributes.

use cryptoki::error::Error as CkError;
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::Session;

use super::error::{breakage, map_err, HsmError};
use super::Hsm;

/// Attributes of one private or secret key object visible to our sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// CKA_LABEL (lossy UTF-8; empty if none).
    pub label: String,
    /// CKA_CLASS, e.g. `CKO_PRIVATE_KEY`.
    pub class: String,
    /// CKA_KEY_TYPE, e.g. `CKK_EC`.
    pub key_type: String,
    /// CKA_TOKEN: a persistent token object (false: session object).
    pub token: bool,
    /// CKA_SENSITIVE.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE.
    pub extractable: bool,
    /// CKA_WRAP_WITH_TRUSTED: extractable only under a key the security officer marked trusted
    /// (every KEK: see `keyward kek backup`).
    pub wrap_with_trusted: bool,
}

impl ObjectInfo {
    /// Can whoever holds the user PIN take this key out of the token in any form?
    pub fn user_can_export(&self) -> bool {
        self.extractable && !self.wrap_with_trusted
    }
}

fn list(s: &Session) -> Result<Vec<ObjectInfo>, CkError> {
    let mut out = Vec::new();
    for class in [ObjectClass::PRIVATE_KEY, ObjectClass::SECRET_KEY] {
        for h in s.find_objects(&[Attribute::Class(class)])? {
            let attrs = s.get_attributes(
                h,
                &[
                    AttributeType::Label,
                    AttributeType::Class,
                    AttributeType::KeyType,
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::WrapWithTrusted,
                ],
            )?;
            let mut info = ObjectInfo {
                label: String::new(),
                class: class.to_string(),
                key_type: String::new(),
                token: false,
                sensitive: false,
                extractable: false,
                wrap_with_trusted: false,
            };
            for a in attrs {
                match a {
                    Attribute::Label(l) => info.label = String::from_utf8_lossy(&l).into_owned(),
                    Attribute::Class(c) => info.class = c.to_string(),
                    Attribute::KeyType(t) => info.key_type = t.to_string(),
                    Attribute::Token(b) => info.token = b,
                    Attribute::Sensitive(b) => info.sensitive = b,
                    Attribute::Extractable(b) => info.extractable = b,
                    Attribute::WrapWithTrusted(b) => info.wrap_with_trusted = b,
                    _ => {}
                }
            }
            out.push(info);
        }
    }
    Ok(out)
}

impl Hsm {
    /// Every private/secret key object visible (token and session objects): label, class,
    /// key type and the token / sensitive / extractable flags. Searches the token (slow with
    /// many objects): for tests and audits, not for the request path.
    pub fn inspect_private_keys(&self) -> Result<Vec<ObjectInfo>, HsmError> {
        const OP: &str = "inspect_private_keys";
        let label = self.inner.pool.label.clone();
        self.inner.pool.with_session(OP, |p| match list(&p.session) {
            Ok(v) => (Ok(v), super::error::Breakage::None),
            Err(e) => (Err(map_err(OP, &e, &label)), breakage(&e)),
        })
    }
}
