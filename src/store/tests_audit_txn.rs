//! Issue 6 on every backend: a state change and the audit event recording
//! it commit together or not at all (account creation, issuer key
//! promotion, creation and removal, spend reservation and release). An
//! append that fails (a squatter row on the next sequence number) must take
//! the state change down with it.

use std::sync::Arc;

use super::tests::{open_new_session, record, spend, Fixture};
use super::tests_jwks::rec as key;
use super::*;
use crate::audit::{Event, NewEvent};

fn event(action: &str) -> NewEvent {
    NewEvent {
        time_ms: 1_700_000_000_000,
        identity: "spiffe://example.org/admin".into(),
        action: action.into(),
        decision: "allow".into(),
        code: "OK".into(),
        ..NewEvent::default()
    }
}

async fn events(store: &Arc<dyn Store>) -> Vec<Event> {
    store.audit().events_after(0, 1000).await.unwrap()
}

async fn head(store: &Arc<dyn Store>) -> u64 {
    store.audit().audit_head().await.unwrap().seq
}

/// Occupies the next sequence number with a row of its own, so the next
/// append fails with a conflict.
async fn squat_next_seq(fx: &Fixture, store: &Arc<dyn Store>) {
    let next = head(store).await + 1;
    let blob = if fx.backend == "sqlite" {
        "zeroblob(32)"
    } else {
        "decode(repeat('00', 32), 'hex')"
    };
    fx.exec(&format!(
        "INSERT INTO audit_events (seq, time_ms, identity, action, account, session, request_id, decision, \
         policies, code, digest, signature_ref, prev_hash, hash) \
         VALUES ({next}, 0, '', 'squat', '', '', '', 'allow', '[]', 'OK', '', '', {blob}, {blob})"
    ))
    .await;
}

async fn unsquat(fx: &Fixture) {
    fx.exec("DELETE FROM audit_events WHERE action = 'squat'").await;
}

async fn account_and_event_commit_together(fx: &Fixture) {
    let store = fx.open().await;
    let rec = record("acct-1");
    let mut ev = event("CreateAccount");
    ev.account = rec.id.clone();
    let seq = store.create_account_audited(&rec, Some(&ev)).await.unwrap();
    assert_eq!(seq, Some(1));
    assert!(store.get_account("acct-1").await.unwrap().is_some());
    let stored = events(&store).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].body.action.as_str(), stored[0].body.account.as_str()),
        ("CreateAccount", "acct-1")
    );
    // A conflicting id writes neither a second account nor an event.
    let err = store.create_account_audited(&rec, Some(&ev)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err:?}");
    assert_eq!((store.count_accounts().await.unwrap(), head(&store).await), (1, 1));
    // A failure half-way (a duplicate key row) leaves neither.
    let mut bad = record("acct-2");
    bad.keys.push(bad.keys[0].clone());
    ev.account = bad.id.clone();
    assert!(store.create_account_audited(&bad, Some(&ev)).await.is_err());
    assert!(store.get_account("acct-2").await.unwrap().is_none());
    assert_eq!(head(&store).await, 1);
    // The event cannot be appended: the account is not stored either.
    squat_next_seq(fx, &store).await;
    let rec3 = record("acct-3");
    ev.account = rec3.id.clone();
    assert!(store.create_account_audited(&rec3, Some(&ev)).await.is_err());
    assert!(store.get_account("acct-3").await.unwrap().is_none());
    unsquat(fx).await;
    assert_eq!(store.create_account_audited(&rec3, Some(&ev)).await.unwrap(), Some(2));
    // Without an event, nothing is appended.
    store.create_account(&record("acct-4")).await.unwrap();
    assert_eq!(head(&store).await, 2);
    store.close().await;
}

async fn states(store: &Arc<dyn Store>) -> Vec<(String, IssuerKeyState)> {
    store
        .list_issuer_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.kid, k.state))
        .collect()
}

async fn promotion_and_event_commit_together(fx: &Fixture) {
    use IssuerKeyState::{Active, Next, Retired};
    let store = fx.open().await;
    for (kid, alg, state, at) in [
        ("a1", "EdDSA", Active, 50),
        ("n1", "EdDSA", Next, 100),
        ("e1", "ES256", Active, 50),
        ("f1", "ES256", Next, 50),
    ] {
        let ev = crate::audit::event::daemon_event("IssuerKeyPublished", format!("kid:{kid}"));
        let (stored, seq) = store
            .add_issuer_key_audited(&key(kid, alg, state, at), Some(&ev))
            .await
            .unwrap();
        assert!(stored);
        assert_eq!(seq, Some(head(&store).await));
    }
    assert_eq!(head(&store).await, 4);
    // A key that loses (one next key per algorithm) appends nothing.
    let ev = event("IssuerKeyPublished");
    assert_eq!(
        store
            .add_issuer_key_audited(&key("n9", "EdDSA", Next, 100), Some(&ev))
            .await
            .unwrap(),
        (false, None)
    );
    assert_eq!(head(&store).await, 4);
    let before = states(&store).await;

    // All or nothing: ES256's next key may be promoted, EdDSA's is too young.
    let audit = PromoteAudit {
        promoted: event("RotateIssuerKey"),
        retired: None,
    };
    let (outcomes, seq) = store
        .promote_issuer_keys_audited(&["ES256", "EdDSA"], 120, 60, None, Some(&audit))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![PromoteOutcome::TooEarly {
            kid: "n1".into(),
            ready_at: 160
        }]
    );
    assert_eq!((seq, head(&store).await), (None, 4));
    assert_eq!(states(&store).await, before);

    // The event cannot be appended: no key changes state.
    squat_next_seq(fx, &store).await;
    assert!(store
        .promote_issuer_keys_audited(&["EdDSA", "ES256"], 200, 60, None, Some(&audit))
        .await
        .is_err());
    assert_eq!(states(&store).await, before);
    unsquat(fx).await;

    // Both algorithms in one transaction, with one event naming both new kids.
    let (outcomes, seq) = store
        .promote_issuer_keys_audited(&["EdDSA", "ES256"], 200, 60, None, Some(&audit))
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            PromoteOutcome::Promoted {
                kid: "n1".into(),
                retired: Some("a1".into())
            },
            PromoteOutcome::Promoted {
                kid: "f1".into(),
                retired: Some("e1".into())
            },
        ]
    );
    assert_eq!(seq, Some(5));
    let all = events(&store).await;
    assert_eq!(all.len(), 5, "one event for the whole rotation");
    assert_eq!(
        (all[4].body.action.as_str(), all[4].body.signature_ref.as_str()),
        ("RotateIssuerKey", "kid:n1,f1")
    );
    let now = states(&store).await;
    for (kid, state) in [("a1", Retired), ("n1", Active), ("e1", Retired), ("f1", Active)] {
        assert!(now.contains(&(kid.to_string(), state)), "{kid}: {now:?}");
    }

    // A scheduled promotion records the retirement as its own event.
    store
        .add_issuer_key_audited(&key("n2", "EdDSA", Next, 300), None)
        .await
        .unwrap();
    let scheduled = PromoteAudit {
        promoted: event("ScheduledRotation"),
        retired: Some(event("IssuerKeyRetired")),
    };
    let (outcomes, seq) = store
        .promote_issuer_keys_audited(&["EdDSA"], 400, 60, Some(300), Some(&scheduled))
        .await
        .unwrap();
    assert!(matches!(outcomes.as_slice(), [PromoteOutcome::Promoted { .. }]));
    assert_eq!(seq, Some(6));
    let tail: Vec<(String, String)> = events(&store).await[5..]
        .iter()
        .map(|e| (e.body.action.clone(), e.body.signature_ref.clone()))
        .collect();
    assert_eq!(
        tail,
        vec![
            ("ScheduledRotation".to_string(), "kid:n2".to_string()),
            ("IssuerKeyRetired".to_string(), "kid:n1".to_string()),
        ]
    );

    // Removal: the row and its event together; a key that is not retired
    // is not removed and appends nothing.
    let removed = event("IssuerKeyRemoved");
    assert_eq!(
        store.delete_issuer_key_audited("n2", Some(&removed)).await.unwrap(),
        (false, None)
    );
    squat_next_seq(fx, &store).await;
    assert!(store.delete_issuer_key_audited("a1", Some(&removed)).await.is_err());
    assert!(states(&store).await.iter().any(|(k, _)| k == "a1"));
    unsquat(fx).await;
    assert_eq!(
        store.delete_issuer_key_audited("a1", Some(&removed)).await.unwrap(),
        (true, Some(8))
    );
    assert!(!states(&store).await.iter().any(|(k, _)| k == "a1"));
    store.close().await;
}

async fn reservation_and_release_record_their_events(fx: &Fixture) {
    let store = fx.open().await;
    open_new_session(&store, "acct", "s-1", 1000).await;
    let base = head(&store).await;
    let session = |store: Arc<dyn Store>| async move {
        let s = store.get_session("s-1").await.unwrap().unwrap();
        (s.remaining, s.uses)
    };
    let mut template = event("SignPayment");
    template.session = "s-1".into();
    template.signature_ref = "spend:s-1/req-1".into();
    let build = |nonce: u64| {
        let mut e = template.clone();
        e.digest = format!("digest-for-nonce-{nonce}");
        e
    };

    // Reserved: the spend and the request's event, built from the nonce.
    let (outcome, seq) = store
        .reserve_spend_audited(&spend("s-1", "req-1", 1, 100), Some(&build))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        SpendOutcome::Reserved {
            remaining: 900,
            nonce: 1
        }
    );
    assert_eq!(seq, Some(base + 1));
    let last = events(&store).await.pop().unwrap();
    assert_eq!(
        (last.body.digest.as_str(), last.body.signature_ref.as_str()),
        ("digest-for-nonce-1", "spend:s-1/req-1")
    );
    // In progress, then completed: completion appends nothing, a replay
    // reserves nothing and appends nothing.
    assert_eq!(
        store
            .reserve_spend_audited(&spend("s-1", "req-1", 1, 100), Some(&build))
            .await
            .unwrap(),
        (SpendOutcome::InProgress, None)
    );
    store.complete_spend("s-1", "req-1", b"response").await.unwrap();
    assert_eq!(
        store
            .reserve_spend_audited(&spend("s-1", "req-1", 1, 100), Some(&build))
            .await
            .unwrap(),
        (
            SpendOutcome::Replay {
                response: b"response".to_vec()
            },
            None
        )
    );
    // A refusal appends nothing.
    assert_eq!(
        store
            .reserve_spend_audited(&spend("s-1", "req-big", 2, 10_000), Some(&build))
            .await
            .unwrap(),
        (
            SpendOutcome::Insufficient {
                remaining: 900,
                asset: None,
                requested: 10_000
            },
            None
        )
    );
    assert_eq!(head(&store).await, base + 1);

    // The event cannot be appended: nothing is reserved.
    squat_next_seq(fx, &store).await;
    assert!(store
        .reserve_spend_audited(&spend("s-1", "req-2", 2, 100), Some(&build))
        .await
        .is_err());
    assert_eq!(session(store.clone()).await, (900, 1));
    unsquat(fx).await;

    // Reserved, then released with a compensating event in the same transaction.
    let (outcome, seq) = store
        .reserve_spend_audited(&spend("s-1", "req-2", 2, 100), Some(&build))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        SpendOutcome::Reserved {
            remaining: 800,
            nonce: 2
        }
    );
    assert_eq!(seq, Some(base + 2));
    let mut release = event("ReleaseSpend");
    release.decision = "error".into();
    release.code = "UNAVAILABLE".into();
    release.signature_ref = "spend:s-1/req-2".into();
    // The compensating event cannot be appended: the spend stays reserved.
    squat_next_seq(fx, &store).await;
    assert!(store
        .release_spend_audited("s-1", "req-2", Some(&release))
        .await
        .is_err());
    assert_eq!(session(store.clone()).await, (800, 2));
    unsquat(fx).await;
    assert_eq!(
        store
            .release_spend_audited("s-1", "req-2", Some(&release))
            .await
            .unwrap(),
        Some(base + 3)
    );
    assert_eq!(session(store.clone()).await, (900, 2));
    let last = events(&store).await.pop().unwrap();
    assert_eq!(
        (
            last.body.action.as_str(),
            last.body.decision.as_str(),
            last.body.code.as_str()
        ),
        ("ReleaseSpend", "error", "UNAVAILABLE")
    );
    // Nothing pending any more (or completed): no release, no event.
    assert_eq!(
        store
            .release_spend_audited("s-1", "req-2", Some(&release))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .release_spend_audited("s-1", "req-1", Some(&release))
            .await
            .unwrap(),
        None
    );
    assert_eq!(head(&store).await, base + 3);
    let report = crate::audit::verify::verify_store(store.as_ref(), &crate::jwks::history::KeyHistory::default())
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    store.close().await;
}

macro_rules! audit_txn_suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            audit_txn_suite!(@cases $fixture;
                account_and_event_commit_together,
                promotion_and_event_commit_together,
                reservation_and_release_record_their_events,
            );
        }
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(fx) = $fixture else { return };
                super::$case(&fx).await;
            }
        )*
    };
}

audit_txn_suite!(sqlite, super::Fixture::sqlite());
audit_txn_suite!(postgres, super::Fixture::postgres());
