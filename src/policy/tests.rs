//! Table tests of the pure decision function with the default set, and of
//! loading: what validates, what is refused and how it is named.

use std::path::PathBuf;

use super::*;
use crate::store::{AccountRecord, SessionRecord};

const ADMIN: &str = "spiffe://example.org/admin";
const MARKETPLACE: &str = "spiffe://example.org/marketplace";
const GATEWAY: &str = "spiffe://example.org/wallet-gateway";
const STRANGER: &str = "spiffe://example.org/stranger";
const MAIL_DOMAIN: &str = "0xcccccccccccccccccccccccccccccccccccccccc";

fn account(allowed: &[&str]) -> AccountRecord {
    AccountRecord {
        id: "5d7c2a4e-1111-4222-8333-444455556666".into(),
        label: Some("alice".into()),
        controller: "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826".into(),
        created_by: ADMIN.into(),
        created_at: 0,
        allowed: allowed.iter().map(|s| s.to_string()).collect(),
        keys: vec![],
        frozen: None,
        deleted_at: None,
    }
}

/// The account with a (made-up) stored key: an account that exists.
fn keyed(mut a: AccountRecord) -> AccountRecord {
    a.keys = vec![crate::store::KeyRecord {
        alg: crate::types::KeyAlg::Ed25519,
        public_key: vec![1; 32],
        wrapped: vec![2; 40],
        kek_version: 1,
        key_version: 1,
    }];
    a
}

fn session(a: &AccountRecord) -> SessionRecord {
    SessionRecord {
        id: "9a7c2a4e-1111-4222-8333-444455556666".into(),
        account_id: a.id.clone(),
        delegate: MARKETPLACE.into(),
        scopes: vec!["payments:0-100".into()],
        cap: 1000,
        remaining: 1000,
        uses: 0,
        issued_at: 0,
        expires_at: 3600,
        challenge_id: "c".into(),
        jti: "j".into(),
        revoked_at: None,
        revoked_by: None,
        scope_grammar: crate::session::SCOPE_GRAMMAR,
    }
}

fn in_session() -> RequestContext {
    RequestContext {
        session: SessionFacts {
            active: true,
            scopes: vec!["payments:0-100".into()],
            ..SessionFacts::default()
        },
        ..RequestContext::default()
    }
}

fn typed(chain: &str, contract: &str) -> Option<TypedDataFacts> {
    Some(TypedDataFacts {
        name: "Ether Mail".into(),
        version: "1".into(),
        chain_id: chain.into(),
        verifying_contract: contract.into(),
        primary_type: "Mail".into(),
    })
}

fn message(len: usize) -> RequestContext {
    RequestContext {
        message: Some(MessageFacts {
            alg: "secp256k1",
            length: len,
        }),
        ..RequestContext::default()
    }
}

fn payment() -> Option<PaymentFacts> {
    Some(PaymentFacts {
        amount: 40,
        currency: "USDC".into(),
        manifest: "ab".repeat(32),
        license: "lic-7".into(),
    })
}

/// (who, action, resource, context, allowed, deciding policies)
type Case<'a> = (&'a str, Action, Resource<'a>, RequestContext, bool, &'a [&'a str]);

#[test]
fn default_set_allows_the_session_story_and_forbids_the_rest() {
    let p = default_policies().expect("the default set validates");
    let a = account(&[]);
    let listed = account(&[MARKETPLACE, GATEWAY]);
    let s = session(&a);
    let svc = Resource::Service;
    let acct = Resource::Account(&a);
    let sess = Resource::Session(&s, &a);
    let ctx = RequestContext::default;
    let with = |f: fn(&mut RequestContext)| {
        let mut c = RequestContext::default();
        f(&mut c);
        c
    };
    use Action::*;
    // (who, action, resource, context, allowed, deciding policies)
    let cases: Vec<Case<'_>> = vec![
        // Accounts.
        (ADMIN, CreateAccount, svc, ctx(), true, &["admins-manage-accounts"]),
        (MARKETPLACE, CreateAccount, svc, ctx(), false, &[]),
        (STRANGER, CreateAccount, svc, ctx(), false, &[]),
        (
            ADMIN,
            GetAccount,
            acct,
            ctx(),
            true,
            &["admins-manage-accounts", "listed-clients-read-account"],
        ),
        (GATEWAY, GetAccount, acct, ctx(), false, &[]),
        (
            GATEWAY,
            GetAccount,
            Resource::Account(&listed),
            ctx(),
            true,
            &["listed-clients-read-account"],
        ),
        (STRANGER, GetAccountJwks, acct, ctx(), true, &["public-keys"]),
        (STRANGER, GetJwks, svc, ctx(), true, &["public-keys"]),
        // The session story: the gateway relays, the marketplace signs inside the session.
        (
            GATEWAY,
            CreateSessionChallenge,
            acct,
            ctx(),
            true,
            &["wallet-gateways-relay"],
        ),
        (GATEWAY, OpenSession, acct, ctx(), true, &["wallet-gateways-relay"]),
        (MARKETPLACE, CreateSessionChallenge, acct, ctx(), false, &[]),
        (
            MARKETPLACE,
            SignPayment,
            acct,
            RequestContext {
                payment: payment(),
                ..in_session()
            },
            true,
            &["marketplace-signs-in-sessions"],
        ),
        (
            MARKETPLACE,
            SignReceipt,
            acct,
            RequestContext {
                payment: payment(),
                ..in_session()
            },
            true,
            &["marketplace-signs-in-sessions"],
        ),
        (
            MARKETPLACE,
            SignAttestation,
            acct,
            in_session(),
            true,
            &["marketplace-signs-in-sessions"],
        ),
        (
            MARKETPLACE,
            SignTypedData,
            acct,
            RequestContext {
                typed_data: typed("1", MAIL_DOMAIN),
                ..in_session()
            },
            true,
            &["marketplace-signs-in-sessions"],
        ),
        (
            MARKETPLACE,
            GetSession,
            sess,
            ctx(),
            true,
            &["delegate-reads-its-session"],
        ),
        (GATEWAY, GetSession, sess, ctx(), true, &["wallet-gateways-relay"]),
        (
            GATEWAY,
            RevokeSession,
            sess,
            with(|c| c.controller_signed = true),
            true,
            &["controller-signed-revocation"],
        ),
        (GATEWAY, RevokeSession, sess, ctx(), false, &[]),
        (MARKETPLACE, RevokeSession, sess, ctx(), false, &[]),
        (
            ADMIN,
            RevokeSession,
            sess,
            ctx(),
            true,
            &["admins-manage-sessions", "creator-reads-and-revokes-sessions"],
        ),
        // Outside sessions the marketplace signs nothing, even when listed.
        (
            MARKETPLACE,
            SignMessage,
            Resource::Account(&listed),
            message(5),
            false,
            &[],
        ),
        (
            MARKETPLACE,
            SignTypedData,
            Resource::Account(&listed),
            RequestContext {
                typed_data: typed("1", MAIL_DOMAIN),
                ..ctx()
            },
            false,
            &[],
        ),
        (
            MARKETPLACE,
            SignReceipt,
            acct,
            RequestContext {
                payment: payment(),
                ..ctx()
            },
            false,
            &[],
        ),
        // Operators sign directly for accounts they are listed on.
        (ADMIN, SignMessage, acct, message(5), true, &["operators-sign-directly"]),
        (
            ADMIN,
            SignTypedData,
            acct,
            RequestContext {
                typed_data: typed("1", MAIL_DOMAIN),
                ..ctx()
            },
            true,
            &["operators-sign-directly"],
        ),
        (
            ADMIN,
            SignReceipt,
            acct,
            RequestContext {
                payment: payment(),
                ..ctx()
            },
            true,
            &["operators-sign-directly"],
        ),
        (GATEWAY, SignMessage, Resource::Account(&listed), message(5), false, &[]),
        // Forbids override the operator's permit.
        (ADMIN, SignMessage, acct, message(32), false, &["forbid-raw-digest"]),
        (
            ADMIN,
            SignTypedData,
            acct,
            RequestContext {
                typed_data: typed("5", MAIL_DOMAIN),
                ..ctx()
            },
            false,
            &["typed-data-allowed-domains"],
        ),
        (
            MARKETPLACE,
            SignTypedData,
            acct,
            RequestContext {
                typed_data: typed("1", "0x0000000000000000000000000000000000000001"),
                ..in_session()
            },
            false,
            &["typed-data-allowed-domains"],
        ),
        // Issuer keys and the audit log: admins.
        (ADMIN, RotateIssuerKey, svc, ctx(), true, &["admins-manage-issuer-keys"]),
        (MARKETPLACE, RotateIssuerKey, svc, ctx(), false, &[]),
        (GATEWAY, ListIssuerKeys, svc, ctx(), false, &[]),
        (ADMIN, ReadAudit, svc, ctx(), true, &["admins-read-audit"]),
        (MARKETPLACE, ReadAudit, svc, ctx(), false, &[]),
    ];
    for (who, action, resource, context, allowed, ids) in cases {
        let d = decide(
            &PolicyRequest {
                principal: who,
                action,
                resource,
                context,
            },
            &p,
        );
        let what = format!("{who} {action:?}");
        assert_eq!(d.allowed, allowed, "{what}: {d:?}");
        assert_eq!(d.policy_ids, ids, "{what}");
        assert_eq!(d.action, action.name());
        assert_eq!(d.limit, None);
    }
}

fn set(policies: &str) -> Result<Policies, PolicyError> {
    let schema = DEFAULT_FILES[0];
    let clients = DEFAULT_FILES[1];
    Policies::from_sources(
        &(PathBuf::from(schema.0), schema.1.to_string()),
        &[(PathBuf::from("test.cedar"), policies.to_string())],
        &(PathBuf::from(clients.0), clients.1.to_string()),
        None,
    )
}

/// The decision on a stranger's five-byte message signed by `a`.
fn stranger_signs(p: &Policies, a: &AccountRecord) -> Decision {
    decide(
        &PolicyRequest {
            principal: STRANGER,
            action: Action::SignMessage,
            resource: Resource::Account(a),
            context: message(5),
        },
        p,
    )
}

#[test]
fn a_forbid_overrides_a_permit() {
    let p = set(r#"
        @id("everyone-signs") permit (principal, action, resource);
        @id("no-frozen") forbid (principal, action in Keyward::Action::"Sign", resource is Keyward::Account)
        when { resource.label == "frozen" };
    "#)
    .expect("valid");
    let mut a = account(&[]);
    let ask = |a: &AccountRecord| stranger_signs(&p, a);
    let d = ask(&a);
    assert!(d.allowed);
    assert_eq!(d.policy_ids, ["everyone-signs"]);
    a.label = Some("frozen".into());
    let d = ask(&a);
    assert!(!d.allowed);
    assert_eq!(d.policy_ids, ["no-frozen"]);
    assert_eq!(d.decided_by(), "no-frozen");
}

/// A decision reads the account as it is now: the entity kept for an
/// account id is not used once the record's operators, controller or
/// creator changed.
#[test]
fn a_kept_account_entity_follows_its_record() {
    let p = set(r#"
        @id("operators-sign") permit (principal, action == Keyward::Action::"SignMessage", resource is Keyward::Account)
        when { principal in resource.allowed || principal == resource.created_by };
        @id("not-this-controller") forbid (principal, action, resource is Keyward::Account)
        when { resource.controller == "0x0000000000000000000000000000000000000001" };
    "#)
    .expect("valid");
    let ask = |a: &AccountRecord| stranger_signs(&p, a).allowed;
    // An account with keys: its entity is kept (a keyless one never is).
    let mut a = keyed(account(&[]));
    assert!(!ask(&a));
    assert_eq!(engine::kept_accounts(&p), 1);
    a.allowed = vec![STRANGER.into()];
    assert!(ask(&a));
    a.controller = "0x0000000000000000000000000000000000000001".into();
    assert!(!ask(&a));
    a.controller = account(&[]).controller;
    assert!(ask(&a));
    a.allowed.clear();
    assert!(!ask(&a));
    a.created_by = STRANGER.into();
    assert!(ask(&a));
    // Another account with the same attributes is its own entity.
    let mut b = a.clone();
    b.id = "5d7c2a4e-1111-4222-8333-777777777777".into();
    b.created_by = ADMIN.into();
    assert!(!ask(&b));
    assert!(ask(&a));
    assert_eq!(engine::kept_accounts(&p), 2);
    // An id a client made up (no keys) is decided, not kept.
    let mut ghost = account(&[]);
    ghost.id = "not-there".into();
    assert!(!ask(&ghost));
    assert_eq!(engine::kept_accounts(&p), 2);
}

/// A decision is kept by everything Cedar sees of its request: asking again
/// with the same inputs is answered from the kept decision, and a change to
/// any input a policy reads is decided afresh.
#[test]
fn a_kept_decision_follows_every_input_it_was_made_from() {
    use std::sync::atomic::Ordering::Relaxed;
    let p = set(r#"
        @id("operators-sign") permit (principal, action in Keyward::Action::"Sign", resource is Keyward::Account)
        when { principal in resource.allowed || principal == resource.created_by };
        @id("not-on-goerli") forbid (principal, action == Keyward::Action::"SignTypedData", resource)
        when { context.typed_data.chain_id == 5 };
        @id("not-alice") forbid (principal, action, resource is Keyward::Account)
        when { resource.label == "alice" && context.typed_data.primary_type == "Permit" };
        @id("delegates-read") permit (principal, action == Keyward::Action::"GetSession", resource is Keyward::Session)
        when { principal == resource.delegate && resource.scopes.contains("read") && resource.expires_at > 100 };
    "#)
    .expect("valid");
    let kept = engine::kept_decisions(&p);
    let hits = || kept.hits.load(Relaxed);
    let ask = |who: &str, a: &AccountRecord, context: RequestContext| {
        let req = PolicyRequest {
            principal: who,
            action: Action::SignTypedData,
            resource: Resource::Account(a),
            context,
        };
        let got = decide(&req, &p);
        assert_eq!(Some(&got), engine::decide_unprepared(&req, &p).as_ref(), "{req:?}");
        got.allowed
    };
    let td = |chain: &str, primary: &str| RequestContext {
        typed_data: typed(chain, MAIL_DOMAIN).map(|t| TypedDataFacts {
            primary_type: primary.into(),
            ..t
        }),
        ..RequestContext::default()
    };
    let mut a = keyed(account(&[STRANGER]));
    assert!(ask(STRANGER, &a, td("1", "Mail")));
    assert_eq!((kept.len(), hits()), (1, 0));
    assert!(ask(STRANGER, &a, td("1", "Mail")));
    assert_eq!((kept.len(), hits()), (1, 1), "the same inputs: the kept decision");
    // A context field no policy of the action reads is not part of the key.
    let mut unread = td("1", "Mail");
    unread.message = Some(MessageFacts {
        alg: "ed25519",
        length: 3,
    });
    if let Some(t) = unread.typed_data.as_mut() {
        t.name = "Other Mail".into();
    }
    assert!(ask(STRANGER, &a, unread));
    assert_eq!((kept.len(), hits()), (1, 2));
    // Each input a policy reads changes the decision, and is decided afresh.
    assert!(!ask(STRANGER, &a, td("5", "Mail")), "context field");
    assert!(
        !ask(STRANGER, &a, td("1", "Permit")),
        "another context field, with the label"
    );
    assert!(!ask(MARKETPLACE, &a, td("1", "Mail")), "principal");
    a.label = Some("bob".into());
    assert!(ask(STRANGER, &a, td("1", "Permit")), "label");
    a.allowed.clear();
    assert!(!ask(STRANGER, &a, td("1", "Mail")), "operators");
    a.created_by = STRANGER.into();
    assert!(ask(STRANGER, &a, td("1", "Mail")), "creator");
    let mut b = a.clone();
    b.id = "5d7c2a4e-1111-4222-8333-777777777777".into();
    b.created_by = ADMIN.into();
    assert!(!ask(STRANGER, &b, td("1", "Mail")), "another account");
    assert_eq!((kept.len(), hits()), (8, 2), "each of them decided afresh");
    // A session's decision follows the session's delegate, scopes and expiry.
    let ask_session = |s: &SessionRecord| {
        let req = PolicyRequest {
            principal: MARKETPLACE,
            action: Action::GetSession,
            resource: Resource::Session(s, &a),
            context: RequestContext::default(),
        };
        let got = decide(&req, &p);
        assert_eq!(Some(&got), engine::decide_unprepared(&req, &p).as_ref(), "{req:?}");
        got.allowed
    };
    let mut s = session(&a);
    s.scopes = vec!["read".into()];
    assert!(ask_session(&s));
    assert!(ask_session(&s));
    s.expires_at = 50;
    assert!(!ask_session(&s), "expiry");
    s.expires_at = 3600;
    s.scopes = vec!["write".into()];
    assert!(!ask_session(&s), "scopes");
    s.scopes = vec!["read".into()];
    s.delegate = GATEWAY.into();
    assert!(!ask_session(&s), "delegate");
    assert_eq!((kept.len(), hits()), (12, 3));
    // An account without keys (an id a client made up) is decided, not kept.
    let mut ghost = account(&[STRANGER]);
    ghost.id = "not-there".into();
    assert!(ask(STRANGER, &ghost, td("1", "Mail")));
    assert!(ask(STRANGER, &ghost, td("1", "Mail")));
    assert_eq!((kept.len(), hits()), (12, 3));

    // Policies that read the clock's seconds: nothing is kept.
    let clock = set(r#"
        @id("after") permit (principal, action == Keyward::Action::"SignTypedData", resource) when { context.time.now > 10 };
    "#)
    .expect("valid");
    let a = keyed(account(&[]));
    for now in [5, 20, 20] {
        let req = PolicyRequest {
            principal: STRANGER,
            action: Action::SignTypedData,
            resource: Resource::Account(&a),
            context: RequestContext {
                now,
                ..RequestContext::default()
            },
        };
        assert_eq!(decide(&req, &clock).allowed, now > 10);
    }
    assert_eq!(engine::kept_decisions(&clock).len(), 0);
}

/// Decides a stranger's `SignMessage` under `p` (a set that allows it) on
/// the keyed account `account-{i}` for each `i` in `ids`; the last decision.
fn decide_messages(p: &Policies, ids: std::ops::RangeInclusive<usize>) -> Decision {
    let mut a = keyed(account(&[]));
    let mut last = None;
    for i in ids {
        a.id = format!("account-{i}");
        let request = PolicyRequest {
            principal: STRANGER,
            action: Action::SignMessage,
            resource: Resource::Account(&a),
            context: message(5),
        };
        let d = decide(&request, p);
        assert!(d.allowed);
        last = Some(d);
    }
    last.expect("at least one account")
}

/// The kept decisions are bounded: a full map is emptied.
#[test]
fn kept_decisions_are_bounded() {
    let p = set(r#"@id("all") permit (principal, action, resource);"#).expect("valid");
    decide_messages(&p, 0..=kept::KEPT_DECISIONS);
    assert_eq!(engine::kept_decisions(&p).len(), 1, "emptied when full, then one kept");
}

#[test]
fn kept_decisions_follow_the_capacity_they_are_given() {
    let p = set(r#"@id("all") permit (principal, action, resource);"#).expect("valid");
    p.keep_decisions(kept::KEPT_DECISIONS + 10);
    decide_messages(&p, 0..=kept::KEPT_DECISIONS);
    // One more than the default holds: with it, the map would have been emptied.
    assert_eq!(engine::kept_decisions(&p).len(), kept::KEPT_DECISIONS + 1);
}

#[test]
fn kept_decisions_are_bounded_in_bytes() {
    let p = set(r#"@id("all") permit (principal, action, resource);"#).expect("valid");
    let decision = decide_messages(&p, 0..=0);
    let kept = kept::KeptDecisions::default();
    let long = kept::KEPT_KEY_BYTES / 8;
    for i in 0..8u8 {
        let mut key = vec![0u8; long];
        key[0] = i;
        kept.insert(key, &decision);
    }
    assert_eq!(kept.len(), 8, "exactly the budget is kept");
    kept.insert(vec![9u8; 1], &decision);
    assert_eq!(kept.len(), 1, "one byte over the budget empties the map");
}

#[test]
fn a_reloaded_set_keeps_as_many_decisions_as_the_one_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policies = dir.path().join("policies");
    install_defaults(&policies).expect("defaults");
    let metrics = crate::metrics::Metrics::new().expect("metrics");
    let point = DecisionPoint::load(&policies, &metrics, std::sync::Arc::new(crate::clock::SystemClock))
        .expect("load")
        .with_kept_decisions(100_000);
    assert_eq!(point.current().kept_capacity(), 100_000);
    point.reload().expect("reload");
    assert_eq!(point.current().kept_capacity(), 100_000);
}

/// The shipped example that allows one contract's one function, uncommented.
#[test]
fn the_one_function_example_allows_that_call_only() {
    let examples = DEFAULT_FILES
        .iter()
        .find(|(name, _)| name.ends_with("examples.cedar"))
        .map(|(_, text)| *text)
        .expect("examples.cedar");
    let start = examples
        .find("// @id(\"payroll-sends-usdc-on-base\")")
        .expect("the example");
    let end = start + examples[start..].find("// };").expect("its end") + "// };".len();
    let policy: String = examples[start..end]
        .lines()
        .map(|l| l.trim_start_matches("//").trim_start())
        .collect::<Vec<_>>()
        .join("\n")
        // The default clients file has no payroll team; the marketplace stands in.
        .replace("\"payroll\"", "\"marketplace\"");
    let p = set(&policy).expect("the example validates");
    let a = account(&[MARKETPLACE]);
    let usdc = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913";
    let ask = |tx: TransactionFacts, session: bool| {
        decide(
            &PolicyRequest {
                principal: MARKETPLACE,
                action: Action::SignTransaction,
                resource: Resource::Account(&a),
                context: RequestContext {
                    session: SessionFacts {
                        active: session,
                        ..SessionFacts::default()
                    },
                    transaction: Some(tx),
                    ..RequestContext::default()
                },
            },
            &p,
        )
        .allowed
    };
    let transfer = TransactionFacts {
        chain_id: 8453,
        to: usdc.into(),
        value: "0".into(),
        selector: "0xa9059cbb".into(),
    };
    assert!(ask(transfer.clone(), false), "USDC transfer on Base");
    for (what, tx) in [
        (
            "approve",
            TransactionFacts {
                selector: "0x095ea7b3".into(),
                ..transfer.clone()
            },
        ),
        (
            "another chain",
            TransactionFacts {
                chain_id: 1,
                ..transfer.clone()
            },
        ),
        (
            "another token",
            TransactionFacts {
                to: MAIL_DOMAIN.into(),
                ..transfer.clone()
            },
        ),
        (
            "with ether",
            TransactionFacts {
                value: "1".into(),
                ..transfer.clone()
            },
        ),
        (
            "no call",
            TransactionFacts {
                selector: String::new(),
                ..transfer.clone()
            },
        ),
    ] {
        assert!(!ask(tx, false), "{what}");
    }
    assert!(!ask(transfer, true), "inside a session the session's scopes decide");
}

#[test]
fn time_context_drives_business_hour_rules() {
    let p = set(r#"
        @id("weekdays") permit (principal, action == Keyward::Action::"GetJwks", resource)
        when { context.time.weekday <= 5 && context.time.hour >= 8 && context.time.hour < 18 };
    "#)
    .expect("valid");
    let at = |now| {
        decide(
            &PolicyRequest {
                principal: ADMIN,
                action: Action::GetJwks,
                resource: Resource::Service,
                context: RequestContext {
                    now,
                    ..RequestContext::default()
                },
            },
            &p,
        )
        .allowed
    };
    // 2026-11-23 is a Monday.
    let monday = 1_795_392_000;
    assert!(at(monday + 9 * 3600), "Monday 09:00");
    assert!(!at(monday + 7 * 3600), "Monday 07:00");
    assert!(!at(monday + 5 * 86_400 + 10 * 3600), "Saturday 10:00");
}

#[test]
fn invalid_sets_are_refused_and_named() {
    let cases = [
        ("permit (principal, action, resource);", "@id"),
        (
            r#"@id("a") permit (principal, action, resource); @id("a") forbid (principal, action, resource);"#,
            "also used",
        ),
        (
            r#"@id("typo") permit (principal, action, resource) when { resource.labl == "x" };"#,
            "typo",
        ),
        (
            r#"@id("unknown-action") permit (principal, action == Keyward::Action::"Nope", resource);"#,
            "unknown-action",
        ),
        (
            "@id(\"x\")\npermit (principal, action, resource) when { 1 + };",
            "line 2",
        ),
        (
            r#"@id("t") permit (principal == ?principal, action, resource);"#,
            "templates",
        ),
    ];
    for (text, needle) in cases {
        match set(text) {
            Err(PolicyError::Invalid { reason, .. }) => {
                assert!(reason.contains(needle), "{text}: {reason:?} should name {needle:?}")
            }
            other => panic!("{text}: expected invalid, got {other:?}"),
        }
    }
}

#[test]
fn every_rpc_of_the_proto_is_an_action_its_handler_asks_for() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut rpcs = Vec::new();
    for entry in std::fs::read_dir(root.join("proto/keyward/v1")).expect("proto dir") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("proto");
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap_or_default().trim().to_string();
                rpcs.push(name);
            }
        }
    }
    assert!(rpcs.len() >= 17, "found the RPCs: {rpcs:?}");
    let mut handlers = String::new();
    let mut dirs = vec![root.join("src/api")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).expect("api dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                handlers.push_str(&std::fs::read_to_string(path).expect("source"));
            }
        }
    }
    let p = default_policies().expect("default set");
    for rpc in &rpcs {
        let action = Action::for_rpc(rpc).unwrap_or_else(|| panic!("RPC {rpc} has no policy action"));
        // The schema declares it (the set would not load otherwise) ...
        assert!(p.declares(action), "{rpc}");
        // ... and a handler puts it to the decision point.
        assert!(
            handlers.contains(&format!("Action::{}", action.name())),
            "no handler in src/api asks the decision point for {rpc}"
        );
    }
    // Every action is asked for by an RPC.
    for a in Action::ALL {
        assert!(rpcs.iter().any(|r| Action::for_rpc(r) == Some(a)), "{a:?}");
    }
}

#[test]
fn shipped_tables_pass_against_the_shipped_set() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let p = Policies::load_dir(&root).expect("policies/ validates");
    let mut cases = 0;
    for entry in std::fs::read_dir(root.join("tests")).expect("policies/tests") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let table = table::Table::load(&path).expect("table parses");
            for o in table.run(&path, &p).expect("table runs") {
                assert!(o.failure.is_none(), "{}: {}: {:?}", path.display(), o.name, o.failure);
                cases += 1;
            }
        }
    }
    assert!(cases >= 20, "ran {cases} cases");
    // A table expecting the wrong outcome fails.
    let wrong = root.join("tests/default.toml");
    let text = std::fs::read_to_string(&wrong)
        .expect("read")
        .replacen("expect = \"allow\"", "expect = \"deny\"", 1);
    let table: table::Table = toml::from_str(&text).expect("parses");
    let failures = table
        .run(&wrong, &p)
        .expect("runs")
        .iter()
        .filter(|o| o.failure.is_some())
        .count();
    assert_eq!(failures, 1);
}

#[test]
fn the_shipped_folder_is_the_built_in_set() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for (name, text) in DEFAULT_FILES {
        assert_eq!(std::fs::read_to_string(root.join(name)).expect(name), text, "{name}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("policies");
    assert!(install_defaults(&target).expect("installs"));
    std::fs::write(target.join("mine.cedar"), "// an operator's file\n").expect("write");
    assert!(
        !install_defaults(&target).expect("second run"),
        "an existing folder is kept"
    );
    assert!(target.join("mine.cedar").exists());
    assert_eq!(
        Policies::load_dir(&target).expect("loads").len(),
        default_policies().expect("built-in").len()
    );
}

/// Policies of every scope form, for holding the prepared decision (sliced
/// set, cached entities, partial context) to the unprepared one.
const SCOPES: &str = r#"
@id("eq-client") permit (principal == Keyward::Client::"spiffe://example.org/marketplace", action, resource);
@id("eq-stranger") permit (principal == Keyward::Client::"spiffe://example.org/stranger", action == Keyward::Action::"GetSession", resource is Keyward::Session);
@id("in-role") forbid (principal in Keyward::Role::"wallet-gateway", action in Keyward::Action::"Sign", resource);
@id("is-client") permit (principal is Keyward::Client, action == Keyward::Action::"GetAccount", resource is Keyward::Account) when { resource.label == "alice" };
@id("is-in-role") permit (principal is Keyward::Client in Keyward::Role::"operator", action == Keyward::Action::"SignMessage", resource) when { context.message.length < 10 };
@id("eq-account") forbid (principal, action, resource == Keyward::Account::"5d7c2a4e-1111-4222-8333-444455556666") when { context.time.hour == 25 };
@id("is-session") permit (principal, action == Keyward::Action::"RevokeSession", resource is Keyward::Session) when { context.controller_signed };
@id("service") permit (principal in Keyward::Role::"admin", action, resource is Keyward::Service);
@id("has") forbid (principal, action == Keyward::Action::"SignPayment", resource) when { context has payment && context.payment.amount > 50 };
@id("team") permit (principal, action == Keyward::Action::"SignTypedData", resource) when { principal.team == "marketplace" && context.typed_data.chain_id == 1 };
"#;

#[test]
fn prepared_decisions_equal_unprepared_ones() {
    // A keyless account (decided afresh each time) and one with keys (its
    // decisions kept): every request below is asked twice.
    let a = account(&[MARKETPLACE]);
    let k = keyed(account(&[MARKETPLACE]));
    let s = session(&a);
    let resources = [
        Resource::Service,
        Resource::Account(&a),
        Resource::Session(&s, &a),
        Resource::Account(&k),
        Resource::Session(&s, &k),
    ];
    let mut pay = in_session();
    pay.payment = Some(PaymentFacts {
        amount: 60,
        ..payment().unwrap_or_default()
    });
    let td = RequestContext {
        typed_data: typed("1", MAIL_DOMAIN),
        ..RequestContext::default()
    };
    let revoke = RequestContext {
        controller_signed: true,
        ..RequestContext::default()
    };
    let contexts = [
        RequestContext::default(),
        in_session(),
        message(5),
        message(32),
        pay,
        td,
        revoke,
    ];
    // Groups of equalities large enough to be indexed, on every kind of
    // attribute the index reads, with literals the requests do and do not
    // carry (including a Long compared with a string-looking value).
    let mut indexed = String::from(SCOPES);
    for i in 0..5 {
        let label = if i == 0 {
            "alice".to_string()
        } else {
            format!("frozen-{i}")
        };
        let team = ["marketplace", "platform", "wallets", "", "x"][i];
        indexed.push_str(&format!(
            r#"@id("label-{i}") forbid (principal, action in Keyward::Action::"Sign", resource is Keyward::Account) when {{ resource.label == "{label}" }};
@id("chain-{i}") forbid (principal, action == Keyward::Action::"SignTypedData", resource) when {{ context.typed_data.chain_id == {i} }};
@id("team-{i}") permit (principal, action == Keyward::Action::"GetAccount", resource) when {{ principal.team == "{team}" }};
@id("len-{i}") permit (principal, action == Keyward::Action::"SignMessage", resource) when {{ {} == context.message.length }};
@id("signed-{i}") permit (principal, action == Keyward::Action::"RevokeSession", resource) when {{ context.controller_signed == {} }};
@id("expiry-{i}") forbid (principal, action == Keyward::Action::"GetSession", resource is Keyward::Session) when {{ resource.expires_at == {} }};
@id("controller-{i}") permit (principal, action == Keyward::Action::"GetAccount", resource is Keyward::Account) when {{ resource.controller == "{}" }};
"#,
            [5, 32, 7, 0, 1][i],
            i % 2 == 0,
            [3600, 0, 1, 2, 3][i],
            if i == 1 { "0xcd2a3d9f938e13cd947ec05abc7fe734df8dd826" } else { "0x00" },
        ));
    }
    let sets = [
        ("default", default_policies().expect("default set")),
        ("scopes", set(SCOPES).expect("scope forms validate")),
        ("indexed", set(&indexed).expect("indexed groups validate")),
    ];
    let mut allowed = 0;
    for (name, p) in &sets {
        for who in [ADMIN, MARKETPLACE, GATEWAY, STRANGER] {
            for action in Action::ALL {
                for resource in resources {
                    for context in &contexts {
                        let req = PolicyRequest {
                            principal: who,
                            action,
                            resource,
                            context: context.clone(),
                        };
                        let what = format!("{name}: {who} {action:?} {resource:?} {context:?}");
                        let want = engine::decide_unprepared(&req, p);
                        for _ in 0..2 {
                            let got = decide(&req, p);
                            match &want {
                                Some(want) => assert_eq!(&got, want, "{what}"),
                                // Outside the schema: refused, nothing matched.
                                None => assert!(!got.allowed && got.policy_ids.is_empty(), "{what}"),
                            }
                            allowed += usize::from(got.allowed);
                        }
                    }
                }
            }
        }
    }
    // The table reaches both outcomes, the index was in use, and decisions were kept.
    assert!(allowed > 50, "{allowed}");
    for (name, p) in &sets {
        let kept = engine::kept_decisions(p);
        assert!(
            kept.len() > 0 && kept.hits.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "{name}"
        );
    }
    assert_eq!(
        engine::indexed_attributes(&sets[0].1),
        0,
        "the default set has no large groups"
    );
    assert!(
        engine::indexed_attributes(&sets[2].1) >= 7,
        "{}",
        engine::indexed_attributes(&sets[2].1)
    );
}

/// A policy folder written for an earlier keyward (its schema lacks an action added since)
/// still loads: the new action is denied to everyone, the others decide as before.
#[test]
fn an_action_the_schema_does_not_declare_is_denied_to_everyone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("policies");
    assert!(install_defaults(&target).expect("installs"));
    let schema = target.join("schema.cedarschema");
    let text = std::fs::read_to_string(&schema).expect("schema");
    let older: String = text
        .lines()
        .filter(|l| !l.contains("action RotateAccountKeys "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(older, text, "the line was there");
    std::fs::write(&schema, older).expect("write");
    let p = Policies::load_dir(&target).expect("an older schema loads");
    assert!(!p.declares(Action::RotateAccountKeys));
    let a = account(&[]);
    let ask = |action| {
        decide(
            &PolicyRequest {
                principal: ADMIN,
                action,
                resource: Resource::Account(&a),
                context: RequestContext::default(),
            },
            &p,
        )
    };
    let refused = ask(Action::RotateAccountKeys);
    assert!(!refused.allowed && refused.policy_ids.is_empty(), "{refused:?}");
    let allowed = ask(Action::FreezeAccount);
    assert!(allowed.allowed, "{allowed:?}");
    assert_eq!(allowed.policy_ids, vec!["admins-manage-accounts".to_string()]);
}
