//! Receipts on every backend: seqs strictly increase, a retry replays, a
//! reused request id with another body is refused, and a failed signer
//! stores nothing.

use std::sync::Arc;

use super::testing::{sqlite_url_in, PgTestSchema};
use super::*;

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    (open(&sqlite_url_in(dir.path())).await.expect("open"), dir)
}

fn account(id: &str) -> AccountRecord {
    AccountRecord {
        id: id.into(),
        label: None,
        controller: "0x52908400098527886E0F7030069857D2E4169EE7".into(),
        created_by: "spiffe://example.org/admin".into(),
        created_at: 1,
        allowed: vec![],
        keys: vec![],
        frozen: None,
        deleted_at: None,
    }
}

fn signer(tag: &'static str) -> ReceiptSigner {
    Box::new(move |f: ReceiptFacts| Box::pin(async move { Ok(format!("{tag}.{}", f.audit_seq)) }))
}

fn failing() -> ReceiptSigner {
    Box::new(|_| Box::pin(async { Err::<String, SignerError>("hsm down".into()) }))
}

const CALLER: &str = "spiffe://example.org/marketplace";
const OTHER_CALLER: &str = "spiffe://example.org/other";

fn new<'a>(receipt_id: &'a str, request_id: &'a str, body: u8) -> NewReceipt<'a> {
    NewReceipt {
        receipt_id,
        account_id: "acct",
        caller: CALLER,
        request_id,
        body_hash: [body; 32],
        session_id: None,
        created_at: 10,
        audit: None,
        abandon: None,
    }
}

async fn suite(store: Arc<dyn Store>) {
    store.create_account(&account("acct")).await.unwrap();
    let mut last = 0;
    for i in 0..3u8 {
        let rid = format!("r{i}");
        let req = format!("q{i}");
        let ReceiptOutcome::Recorded(rec) = store.record_receipt(&new(&rid, &req, i), signer("jws")).await.unwrap()
        else {
            panic!("not recorded")
        };
        assert!(rec.seq > last, "seq {} after {last}", rec.seq);
        assert_eq!(rec.jws, format!("jws.{}", rec.seq));
        last = rec.seq;
    }
    // Retry: the first receipt, whatever the signer would say now.
    let ReceiptOutcome::Replay(again) = store.record_receipt(&new("other", "q1", 1), signer("x")).await.unwrap() else {
        panic!("not a replay")
    };
    assert_eq!(again.receipt_id, "r1");
    assert!(again.jws.starts_with("jws."));
    assert_eq!(
        store.get_receipt("acct", CALLER, "q1").await.unwrap(),
        Some(again.clone())
    );
    // Another caller's key of the same name is its own: a receipt of its own
    // (even with another body), and each caller gets its own back.
    let theirs = NewReceipt {
        caller: OTHER_CALLER,
        ..new("theirs", "q1", 9)
    };
    let ReceiptOutcome::Recorded(their_first) = store.record_receipt(&theirs, signer("jws")).await.unwrap() else {
        panic!("another caller's request id is not recorded as its own")
    };
    assert_eq!(
        (their_first.receipt_id.as_str(), their_first.caller.as_str()),
        ("theirs", OTHER_CALLER)
    );
    assert_ne!(their_first.seq, again.seq);
    let ReceiptOutcome::Replay(their_again) = store.record_receipt(&theirs, signer("x")).await.unwrap() else {
        panic!("not a replay for the other caller")
    };
    assert_eq!(their_again, their_first);
    assert_eq!(store.get_receipt("acct", CALLER, "q1").await.unwrap(), Some(again));
    assert_eq!(
        store
            .get_receipt("acct", "spiffe://example.org/nobody", "q1")
            .await
            .unwrap(),
        None
    );
    // Same id, other body.
    assert!(matches!(
        store.record_receipt(&new("other", "q1", 9), signer("x")).await.unwrap(),
        ReceiptOutcome::BodyMismatch
    ));
    // A failed signer stores nothing; the next receipt still gets a higher seq.
    assert!(matches!(
        store.record_receipt(&new("failed", "qf", 5), failing()).await.unwrap(),
        ReceiptOutcome::SignFailed(_)
    ));
    assert_eq!(store.get_receipt("acct", CALLER, "qf").await.unwrap(), None);
    let ReceiptOutcome::Recorded(rec) = store.record_receipt(&new("r9", "q9", 9), signer("jws")).await.unwrap() else {
        panic!("not recorded")
    };
    assert!(rec.seq > last);
    // Concurrent: distinct requests get distinct seqs; one request id, one receipt.
    let mut tasks = Vec::new();
    for i in 0..8u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let rid = format!("c{i}");
            let req = if i % 2 == 0 {
                "same".to_string()
            } else {
                format!("own{i}")
            };
            let slow: ReceiptSigner = Box::new(|f: ReceiptFacts| {
                Box::pin(async move {
                    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                    Ok(format!("jws.{}", f.audit_seq))
                })
            });
            store.record_receipt(&new(&rid, &req, 7), slow).await.unwrap()
        }));
    }
    let mut recorded = Vec::new();
    let mut same = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            ReceiptOutcome::Recorded(r) => {
                if i % 2 == 0 {
                    same.push(r.seq);
                }
                recorded.push(r.seq);
            }
            // A retry that met the shared id's row still unsigned signed it
            // (with the recorded facts) and stored it first.
            ReceiptOutcome::Completed(r) => {
                assert_eq!(i % 2, 0, "only the shared id has retries");
                same.push(r.seq);
                recorded.push(r.seq);
            }
            ReceiptOutcome::Replay(r) => same.push(r.seq),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(recorded.len(), 5, "four own requests and one of the shared id");
    let mut dedup = recorded.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), recorded.len(), "distinct seqs");
    assert!(same.iter().all(|s| *s == same[0]), "{same:?}");
    // Unknown account: refused by the foreign key, nothing returned.
    let mut orphan = new("r10", "q10", 1);
    orphan.account_id = "nope";
    assert!(store.record_receipt(&orphan, signer("jws")).await.is_err());
    store.close().await;
}

/// The signer runs with no store lock held: while a receipt's signature is
/// outstanding (a slow HSM), audit appends and other receipts commit.
async fn signing_holds_no_lock(store: Arc<dyn Store>) {
    store.create_account(&account("acct")).await.unwrap();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let held: ReceiptSigner = Box::new(move |f: ReceiptFacts| {
        Box::pin(async move {
            let _ = started_tx.send(());
            let _ = released.await;
            Ok(format!("slow.{}", f.audit_seq))
        })
    });
    let slow = {
        let store = store.clone();
        tokio::spawn(async move { store.record_receipt(&new("slow", "q-slow", 1), held).await })
    };
    started.await.expect("the signer started");
    let other = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        store.record_receipt(&new("quick", "q-quick", 2), signer("jws")),
    )
    .await
    .expect("another receipt commits while a signature is outstanding")
    .unwrap();
    assert!(matches!(other, ReceiptOutcome::Recorded(_)), "{other:?}");
    let e = crate::audit::NewEvent {
        action: "Probe".into(),
        ..Default::default()
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), store.audit().append_events(&[e]))
        .await
        .expect("an audit append commits while a signature is outstanding")
        .unwrap();
    let _ = release.send(());
    let ReceiptOutcome::Recorded(rec) = slow.await.unwrap().unwrap() else {
        panic!("the slow receipt is recorded")
    };
    assert_eq!(rec.jws, format!("slow.{}", rec.seq));
    store.close().await;
}

/// A receipt recorded but never signed (the process died while signing) is
/// completed by a retry of the same request: the recorded id, time and
/// audit seq are signed, not the retry's own.
async fn an_unsigned_receipt_is_completed_by_its_retry(store: Arc<dyn Store>) {
    store.create_account(&account("acct")).await.unwrap();
    let never: ReceiptSigner = Box::new(|_| Box::pin(std::future::pending()));
    let first = new("first", "q1", 1);
    let cut = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        store.record_receipt(&first, never),
    )
    .await;
    assert!(cut.is_err(), "the first try never finishes signing");
    let pending = store
        .get_receipt("acct", CALLER, "q1")
        .await
        .unwrap()
        .expect("row recorded");
    assert!(pending.jws.is_empty());
    let mut retry = new("second", "q1", 1);
    retry.created_at = 99;
    let ReceiptOutcome::Completed(done) = store.record_receipt(&retry, signer("jws")).await.unwrap() else {
        panic!("the retry completes the recorded receipt")
    };
    assert_eq!(
        (done.receipt_id.as_str(), done.created_at, done.seq),
        ("first", 10, pending.seq)
    );
    assert_eq!(done.jws, format!("jws.{}", pending.seq));
    let ReceiptOutcome::Replay(again) = store.record_receipt(&retry, signer("x")).await.unwrap() else {
        panic!("then it replays")
    };
    assert_eq!(again, done);
    // The same request with another body is still refused.
    assert!(matches!(
        store.record_receipt(&new("third", "q1", 2), signer("x")).await.unwrap(),
        ReceiptOutcome::BodyMismatch
    ));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_holds_no_lock_sqlite() {
    let (store, _dir) = sqlite().await;
    signing_holds_no_lock(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_holds_no_lock_postgres() {
    let Some(schema) = PgTestSchema::create() else { return };
    signing_holds_no_lock(open(schema.url()).await.expect("open")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_receipt_is_completed_by_its_retry_sqlite() {
    let (store, _dir) = sqlite().await;
    an_unsigned_receipt_is_completed_by_its_retry(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_receipt_is_completed_by_its_retry_postgres() {
    let Some(schema) = PgTestSchema::create() else { return };
    an_unsigned_receipt_is_completed_by_its_retry(open(schema.url()).await.expect("open")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_sqlite() {
    let (store, _dir) = sqlite().await;
    suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_postgres() {
    let Some(schema) = PgTestSchema::create() else { return };
    suite(open(schema.url()).await.expect("open")).await;
}
