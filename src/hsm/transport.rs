//! Moving a secret out of the token without reading a secret attribute.
//!
//! cryptoki 0.12's `Session::get_attributes` copies every value it reads out of its own
//! internal buffer and frees that buffer without zeroizing it: reading CKA_VALUE of a key would
//! leave a plaintext copy in freed heap memory that no wrapper of ours can reach. So secrets
//! leave the token only encrypted: the object is wrapped (`CKM_AES_KEY_WRAP_PAD`) under a
//! one-time AES-256 session key whose value only this function knows, and the wrap is undone
//! here, in software, straight into a zeroizing buffer. The one-time key's bytes live in
//! zeroizing memory and in the C_CreateObject template, which is scrubbed after use; the
//! session object is destroyed before returning.
//!
//! Callers scrub the stack after the whole operation (see `keys::locked::scrub_stack`): AES
//! rounds leave block state on it.

use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::error::{Fail, HsmError};
use super::generate::{destroy_quietly, scrub, wrap_mechanism};

/// The plaintext of an extractable object `h` (for a key unwrapped as a generic secret: the
/// PKCS#8 bytes), in zeroizing memory.
pub(crate) fn export(s: &Session, h: ObjectHandle) -> Result<Zeroizing<Vec<u8>>, Fail> {
    let mut key = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut key[..]);
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Value(key.to_vec()),
    ];
    let transport = s.create_object(&template);
    scrub(&mut template);
    let transport = transport?;
    let wrapped = s.wrap_key(&wrap_mechanism(), transport, h);
    destroy_quietly(s, transport, "transport key");
    let wrapped = wrapped?;
    let kek = aes_kw::KekAes256::new(&(*key).into());
    let mut out = Zeroizing::new(vec![0u8; wrapped.len().saturating_sub(aes_kw::IV_LEN)]);
    let len = kek
        .unwrap_with_padding(&wrapped, &mut out)
        .map_err(|_| HsmError::Internal {
            op: "export",
            rv: "the token's key wrap did not unwrap under the transport key".to_string(),
        })?
        .len();
    out.truncate(len);
    Ok(out)
}
