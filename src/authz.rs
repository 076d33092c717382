//! Interim authorization until the policy engine lands: configured admins
//! create accounts; an account signs only for its creator and the identities
//! listed at creation. Deny by default. A pure function of its inputs.

use crate::store::AccountRecord;

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create an account.
    CreateAccount,
    /// Read an account's public description.
    ShowAccount,
    /// Have an account sign.
    Sign,
    /// Request session challenges, open sessions, read them, and revoke them
    /// with the controller's signature.
    ManageSessions,
    /// Revoke a session without the controller's signature.
    RevokeSession,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{identity} may not {action:?}: {rule}")]
pub struct Denied {
    /// The caller.
    pub identity: String,
    /// What it asked.
    pub action: Action,
    /// The rule that decided.
    pub rule: &'static str,
}

/// The interim rules.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    admins: Vec<String>,
    wallet_gateways: Vec<String>,
}

impl Authz {
    /// Rules with these admin identities.
    pub fn new(admins: Vec<String>) -> Authz {
        Authz {
            admins,
            wallet_gateways: Vec::new(),
        }
    }

    /// Identities that relay wallets (challenges, opening, signed revocation) for any account.
    pub fn with_wallet_gateways(mut self, gateways: Vec<String>) -> Authz {
        self.wallet_gateways = gateways;
        self
    }

    /// Whether `identity` is a configured admin.
    pub fn is_admin(&self, identity: &str) -> bool {
        self.admins.iter().any(|a| a == identity)
    }

    /// Decides; `account` is the account the request is about, if any.
    pub fn decide(&self, identity: &str, action: Action, account: Option<&AccountRecord>) -> Result<(), Denied> {
        let deny = |rule| {
            Err(Denied {
                identity: identity.to_string(),
                action,
                rule,
            })
        };
        let listed = |a: &AccountRecord| a.created_by == identity || a.allowed.iter().any(|x| x == identity);
        match (action, account) {
            (Action::CreateAccount, _) if self.is_admin(identity) => Ok(()),
            (Action::CreateAccount, _) => deny("only admins create accounts"),
            (Action::ShowAccount, Some(a)) if self.is_admin(identity) || listed(a) => Ok(()),
            (Action::Sign, Some(a)) if listed(a) => Ok(()),
            (Action::ManageSessions, Some(a))
                if self.is_admin(identity) || listed(a) || self.wallet_gateways.iter().any(|g| g == identity) =>
            {
                Ok(())
            }
            (Action::RevokeSession, Some(a)) if self.is_admin(identity) || a.created_by == identity => Ok(()),
            (Action::ShowAccount | Action::Sign | Action::ManageSessions | Action::RevokeSession, _) => {
                deny("identity is not allowed on this account")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> AccountRecord {
        AccountRecord {
            id: "a".into(),
            label: None,
            controller: "0x0000000000000000000000000000000000000001".into(),
            created_by: "spiffe://example.org/admin".into(),
            created_at: 0,
            allowed: vec!["spiffe://example.org/marketplace".into()],
            keys: vec![],
        }
    }

    #[test]
    fn table() {
        let z = Authz::new(vec![
            "spiffe://example.org/admin".into(),
            "spiffe://example.org/admin2".into(),
        ]);
        let a = account();
        let cases = [
            ("spiffe://example.org/admin", Action::CreateAccount, true),
            ("spiffe://example.org/marketplace", Action::CreateAccount, false),
            ("spiffe://example.org/admin", Action::Sign, true),
            ("spiffe://example.org/admin2", Action::Sign, false),
            ("spiffe://example.org/admin2", Action::ShowAccount, true),
            ("spiffe://example.org/marketplace", Action::Sign, true),
            ("spiffe://example.org/marketplace", Action::ShowAccount, true),
            ("spiffe://example.org/wallet-gateway", Action::Sign, false),
            ("spiffe://example.org/wallet-gateway", Action::ShowAccount, false),
        ];
        for (who, action, allowed) in cases {
            assert_eq!(z.decide(who, action, Some(&a)).is_ok(), allowed, "{who} {action:?}");
        }
        assert!(z.decide("spiffe://example.org/admin", Action::Sign, None).is_err());
        let z = z.with_wallet_gateways(vec!["spiffe://example.org/wallet-gateway".into()]);
        let gw = "spiffe://example.org/wallet-gateway";
        assert!(z.decide(gw, Action::ManageSessions, Some(&a)).is_ok());
        assert!(z.decide(gw, Action::RevokeSession, Some(&a)).is_err());
        assert!(z.decide(gw, Action::Sign, Some(&a)).is_err());
        assert!(z
            .decide("spiffe://example.org/admin", Action::RevokeSession, Some(&a))
            .is_ok());
        assert!(z
            .decide("spiffe://example.org/marketplace", Action::RevokeSession, Some(&a))
            .is_err());
        assert!(z
            .decide("spiffe://example.org/other", Action::ManageSessions, Some(&a))
            .is_err());
    }
}
