//! Session tokens: compact JWS (EdDSA) by the daemon's issuer key. The token
//! names the session; the store holds its live state.

use serde::{Deserialize, Serialize};

/// The JWS `typ` of session tokens.
pub const TOKEN_TYP: &str = "keyward-session+jwt";
/// The `iss` claim.
pub const ISSUER: &str = "keyward";

/// What a session token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionClaims {
    /// Issuer.
    pub iss: String,
    /// Session id.
    pub sid: String,
    /// The account.
    pub sub: String,
    /// The delegate identity.
    pub aud: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Cumulative cap, decimal.
    pub cap: String,
    /// Issued at, UTC seconds.
    pub iat: i64,
    /// Expires at, UTC seconds.
    pub exp: i64,
    /// Token id.
    pub jti: String,
}
