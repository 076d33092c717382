//! The audit log on every backend: dense hash chain, in-transaction
//! receipt events, checkpoints, archive and prune, and tamper detection
//! (edited, deleted, reordered rows, truncated tail) naming the right
//! sequence number.

use std::sync::Arc;

use ed25519_dalek::Signer as _;

use super::testing::{sqlite_url_in, PgTestSchema};
use super::*;
use crate::audit::checkpoint::{pending_claims, store_checkpoint};
use crate::audit::verify::{verify_export, verify_store, Report};
use crate::audit::{Checkpoint, NewEvent, CHECKPOINT_TYP};
use crate::crypto::jwk::Jwk;
use crate::crypto::jws::{self, JwsAlg, JwsError};
use crate::jwks::history::KeyHistory;

fn event(i: u64) -> NewEvent {
    NewEvent {
        time_ms: 1_700_000_000_000 + i as i64,
        identity: "spiffe://example.org/marketplace".into(),
        action: "SignMessage".into(),
        account: format!("acct-{i}"),
        decision: "allow".into(),
        code: "OK".into(),
        digest: hex::encode([i as u8; 32]),
        signature_ref: format!("sig:{i}"),
        ..NewEvent::default()
    }
}

struct Key {
    sk: ed25519_dalek::SigningKey,
    jwk: Jwk,
}

fn key() -> Key {
    let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let jwk = Jwk::ed25519(sk.verifying_key().as_bytes()).expect("jwk");
    Key { sk, jwk }
}

async fn checkpoint(store: &dyn Store, k: &Key) -> Checkpoint {
    let claims = pending_claims(store, time::OffsetDateTime::now_utc().unix_timestamp())
        .await
        .unwrap()
        .expect("events to checkpoint");
    let value = serde_json::to_value(&claims).unwrap();
    let token = jws::sign_compact::<JwsError>(JwsAlg::EdDSA, &k.jwk.kid, CHECKPOINT_TYP, &value, |input| {
        Ok(k.sk.sign(input).to_bytes().to_vec())
    })
    .unwrap();
    store_checkpoint(store, &claims, token).await.unwrap().expect("stored")
}

/// Ten events in three batches; a checkpoint over 1..=6.
async fn populate(store: &dyn Store, k: &Key) {
    let a = store
        .audit()
        .append_events(&[event(1), event(2), event(3)])
        .await
        .unwrap();
    assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(a[0].prev_hash, crate::audit::GENESIS);
    assert_eq!(a[1].prev_hash, a[0].hash);
    let b = store
        .audit()
        .append_events(&[event(4), event(5), event(6)])
        .await
        .unwrap();
    assert_eq!(b[0].prev_hash, a[2].hash);
    let cp = checkpoint(store, k).await;
    assert_eq!((cp.first_seq, cp.last_seq), (1, 6));
    let c = store
        .audit()
        .append_events(&[event(7), event(8), event(9), event(10)])
        .await
        .unwrap();
    assert_eq!(c.last().unwrap().seq, 10);
    assert_eq!(c[0].prev_hash, b[2].hash);
}

async fn raw(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

async fn report(url: &str, k: &Key) -> Report {
    let store = open(url).await.unwrap();
    let r = verify_store(store.as_ref(), &KeyHistory::from_jwks(std::slice::from_ref(&k.jwk)))
        .await
        .unwrap();
    store.close().await;
    r
}

/// Each case: a fresh log, one tampering, the seq verify must name.
const CASES: &[(&str, &str, u64)] = &[
    ("edit", "UPDATE audit_events SET account = 'acct-x' WHERE seq = 4", 4),
    (
        "edit-time",
        "UPDATE audit_events SET time_ms = time_ms + 1 WHERE seq = 9",
        9,
    ),
    ("delete", "DELETE FROM audit_events WHERE seq = 5", 5),
    (
        "swap",
        "UPDATE audit_events SET seq = -1 WHERE seq = 3; UPDATE audit_events SET seq = 3 WHERE seq = 7; \
         UPDATE audit_events SET seq = 7 WHERE seq = -1",
        3,
    ),
    ("truncate-tail", "DELETE FROM audit_events WHERE seq >= 8", 8),
    (
        // The tail after the checkpoint and part of its range, head rewound
        // too: the signed checkpoint still names the first missing event.
        "truncate-into-checkpoint",
        "DELETE FROM audit_events WHERE seq >= 5; UPDATE audit_head SET seq = 4, \
         hash = (SELECT hash FROM audit_events WHERE seq = 4)",
        5,
    ),
    (
        // A rewritten checkpoint row (root of other events) fails its signature check.
        "checkpoint-row",
        "UPDATE audit_checkpoints SET last_seq = 7 WHERE first_seq = 1",
        1,
    ),
];

async fn tamper_suite(fresh: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = String>>>) {
    let k = key();
    // Untouched: verifies, with the checkpoint.
    let url = fresh().await;
    {
        let store = open(&url).await.unwrap();
        populate(store.as_ref(), &k).await;
        store.close().await;
    }
    let ok = report(&url, &k).await;
    assert!(ok.ok(), "{ok:?}");
    assert_eq!((ok.events, ok.last_seq, ok.checkpoints_verified), (10, 10, 1));
    // Without the signing key the checkpoint does not verify.
    let other = Key {
        sk: ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]),
        jwk: Jwk::ed25519(
            ed25519_dalek::SigningKey::from_bytes(&[9u8; 32])
                .verifying_key()
                .as_bytes(),
        )
        .unwrap(),
    };
    assert_eq!(report(&url, &other).await.first_bad_seq, Some(1));
    for (name, sql, expected) in CASES {
        let url = fresh().await;
        let store = open(&url).await.unwrap();
        populate(store.as_ref(), &k).await;
        store.close().await;
        raw(&url, sql).await;
        let r = report(&url, &k).await;
        assert_eq!(r.first_bad_seq, Some(*expected), "{name}: {r:?}");
        assert!(r.reason.is_some(), "{name}");
    }
}

async fn receipts_and_archive(store: Arc<dyn Store>, dir: &std::path::Path) {
    let k = key();
    store
        .create_account(&AccountRecord {
            id: "acct".into(),
            label: None,
            controller: "0x52908400098527886E0F7030069857D2E4169EE7".into(),
            created_by: "spiffe://example.org/admin".into(),
            created_at: 1,
            allowed: vec![],
            keys: vec![],
            frozen: None,
            deleted_at: None,
        })
        .await
        .unwrap();
    store.audit().append_events(&[event(1), event(2)]).await.unwrap();
    let mut receipt_event = event(3);
    receipt_event.action = "SignReceipt".into();
    receipt_event.signature_ref = "receipt:r1".into();
    let new = NewReceipt {
        receipt_id: "r1",
        account_id: "acct",
        caller: "spiffe://example.org/admin",
        request_id: "q1",
        body_hash: [1; 32],
        session_id: None,
        created_at: 10,
        audit: Some(receipt_event),
        abandon: None,
    };
    let signer: ReceiptSigner = Box::new(|f: ReceiptFacts| Box::pin(async move { Ok(format!("jws.{}", f.audit_seq)) }));
    let ReceiptOutcome::Recorded(rec) = store.record_receipt(&new, signer).await.unwrap() else {
        panic!("not recorded")
    };
    assert_eq!(rec.seq, 3, "the receipt's audit_seq is its event's seq");
    assert_eq!(rec.jws, "jws.3");
    assert_eq!(
        store
            .get_receipt("acct", "spiffe://example.org/admin", "q1")
            .await
            .unwrap()
            .unwrap()
            .seq,
        3
    );
    let events = store.audit().events_after(0, 100).await.unwrap();
    assert_eq!(events[2].body.signature_ref, "receipt:r1");
    // A failed signer withdraws the receipt: its event stays, and the
    // compensating event follows it.
    let mut failed = new.clone();
    failed.request_id = "q2";
    failed.receipt_id = "r2";
    let mut withdraw = event(5);
    withdraw.action = "WithdrawReceipt".into();
    withdraw.signature_ref = "receipt:r2".into();
    failed.abandon = Some(withdraw);
    let failing: ReceiptSigner = Box::new(|_| Box::pin(async { Err::<String, SignerError>("hsm down".into()) }));
    assert!(matches!(
        store.record_receipt(&failed, failing).await.unwrap(),
        ReceiptOutcome::SignFailed(_)
    ));
    assert_eq!(
        store
            .get_receipt("acct", "spiffe://example.org/admin", "q2")
            .await
            .unwrap(),
        None
    );
    let events = store.audit().events_after(3, 100).await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.body.action.as_str(), e.body.signature_ref.as_str()))
            .collect::<Vec<_>>(),
        [("SignReceipt", "receipt:r1"), ("WithdrawReceipt", "receipt:r2")]
    );
    // Checkpoint 1..=5, more events, archive through 5: the store and the
    // archive each verify on their own.
    checkpoint(store.as_ref(), &k).await;
    store.audit().append_events(&[event(6), event(7)]).await.unwrap();
    checkpoint(store.as_ref(), &k).await;
    store.audit().append_events(&[event(8)]).await.unwrap();
    let out = dir.join("archive.jsonl");
    assert!(
        crate::audit::export::archive(store.as_ref(), 6, &out).await.is_err(),
        "not a checkpoint end"
    );
    assert_eq!(crate::audit::export::archive(store.as_ref(), 5, &out).await.unwrap(), 5);
    let keys = KeyHistory::from_jwks(std::slice::from_ref(&k.jwk));
    let r = verify_store(store.as_ref(), &keys).await.unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!((r.first_seq, r.last_seq, r.checkpoints_verified), (6, 8, 1));
    let (events, cps) = crate::audit::export::read_export(&out).unwrap();
    let r = verify_export(&events, &cps, &keys);
    assert!(r.ok(), "{r:?}");
    assert_eq!((r.events, r.checkpoints_verified), (5, 1));
    // An edited archive line is caught.
    let mut bad = events.clone();
    bad[1].body.account = "x".into();
    assert_eq!(verify_export(&bad, &cps, &keys).first_bad_seq, Some(2));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tamper_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let n = std::sync::atomic::AtomicU32::new(0);
    tamper_suite(|| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let url = sqlite_url_in(&base.join(format!("db{i}")));
        Box::pin(async move { url })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tamper_postgres() {
    let schemas = std::sync::Mutex::new(Vec::new());
    let Some(probe) = PgTestSchema::create() else { return };
    schemas.lock().unwrap().push(probe);
    tamper_suite(|| {
        let s = PgTestSchema::create().expect("postgres");
        let url = s.url().to_string();
        schemas.lock().unwrap().push(s);
        Box::pin(async move { url })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_receipts_archive_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&sqlite_url_in(dir.path())).await.unwrap();
    receipts_and_archive(store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_receipts_archive_postgres() {
    let Some(schema) = PgTestSchema::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    receipts_and_archive(open(schema.url()).await.unwrap(), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_concurrent_appends_form_one_chain_postgres() {
    let Some(schema) = PgTestSchema::create() else { return };
    // Two stores on one database stand for two replicas.
    let a = open(schema.url()).await.unwrap();
    let b = open(schema.url()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.audit().append_events(&[event(i), event(i + 100)]).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = verify_store(a.as_ref(), &KeyHistory::default()).await.unwrap();
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.events, 40);
}

/// What a checkpoint reads: the last checkpoint only, and the events'
/// hashes only; a missing event stops a checkpoint instead of being
/// skipped over.
async fn checkpoint_reads(url: &str) {
    let k = key();
    let store = open(url).await.unwrap();
    assert_eq!(store.audit().last_checkpoint().await.unwrap(), None);
    populate(store.as_ref(), &k).await;
    let second = checkpoint(store.as_ref(), &k).await;
    assert_eq!((second.first_seq, second.last_seq), (7, 10));
    assert_eq!(store.audit().last_checkpoint().await.unwrap(), Some(second));

    let events = store.audit().events_after(0, 100).await.unwrap();
    let hashes = store.audit().event_hashes(3, 8).await.unwrap();
    let expected: Vec<(u64, [u8; 32])> = events[2..8].iter().map(|e| (e.seq, e.hash)).collect();
    assert_eq!(hashes, expected);
    assert!(store.audit().event_hashes(11, 20).await.unwrap().is_empty());
    // The embedded store's checkpoints read them on a connection of their own: the same rows.
    if let Some(target) = store.direct_audit() {
        let direct = crate::audit::writer::event_hashes(&target.path, 3, 8).unwrap();
        assert_eq!(direct, expected);
        assert!(crate::audit::writer::event_hashes(&target.path, 11, 20)
            .unwrap()
            .is_empty());
    }

    store
        .audit()
        .append_events(&[event(11), event(12), event(13)])
        .await
        .unwrap();
    raw(url, "DELETE FROM audit_events WHERE seq = 12").await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    match pending_claims(store.as_ref(), now).await {
        Err(crate::audit::AuditError::Invalid(m)) => assert!(m.contains("11..=13"), "{m}"),
        other => panic!("a gap was checkpointed over: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_checkpoint_reads_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint_reads(&sqlite_url_in(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_checkpoint_reads_postgres() {
    let Some(schema) = PgTestSchema::create() else { return };
    checkpoint_reads(schema.url()).await;
}
