//! Limit counters on every backend: a bucket empties, refills with time and
//! holds exactly its capacity under concurrent takes; a total stops at its cap
//! under concurrent adds and survives reopening the store.

use std::sync::Arc;

use super::limits::Bucket;
use super::testing::{sqlite_url_in, PgTestSchema};
use super::*;

const NO_REFILL: Bucket = Bucket {
    capacity: 10,
    refill_milli_per_second: 0,
};

async fn suite(store: Arc<dyn Store>) {
    let b = Bucket {
        capacity: 2,
        refill_milli_per_second: 1000,
    };
    assert!(store.take_token("rate:a", b, 100).await.expect("take"));
    assert!(store.take_token("rate:a", b, 100).await.expect("take"));
    assert!(!store.take_token("rate:a", b, 100).await.expect("take"), "empty");
    assert!(
        !store.take_token("rate:a", b, 100).await.expect("take"),
        "a refusal takes nothing"
    );
    assert!(
        store.take_token("rate:b", b, 100).await.expect("take"),
        "buckets are per key"
    );
    assert!(
        store.take_token("rate:a", b, 101).await.expect("take"),
        "refilled one token"
    );
    assert!(!store.take_token("rate:a", b, 101).await.expect("take"));

    // Concurrent takes: exactly the capacity succeeds.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = store.clone();
        tasks.push(tokio::spawn(
            async move { s.take_token("rate:c", NO_REFILL, 100).await },
        ));
    }
    let mut taken = 0;
    for t in tasks {
        if t.await.expect("task").expect("take") {
            taken += 1;
        }
    }
    assert_eq!(taken, 10);

    // Totals.
    assert_eq!(store.add_to_total("spend:x", 60, 100, 1).await.expect("add"), Some(60));
    assert_eq!(store.add_to_total("spend:x", 41, 100, 1).await.expect("add"), None);
    assert_eq!(store.add_to_total("spend:x", 40, 100, 1).await.expect("add"), Some(100));
    store.subtract_from_total("spend:x", 30, 2).await.expect("subtract");
    assert_eq!(store.add_to_total("spend:x", 30, 100, 2).await.expect("add"), Some(100));
    store
        .subtract_from_total("spend:y", 30, 2)
        .await
        .expect("subtract from nothing");
    assert_eq!(store.add_to_total("spend:y", 0, 100, 2).await.expect("add"), Some(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move { s.add_to_total("spend:z", 10, 100, 3).await }));
    }
    let mut added = 0;
    for t in tasks {
        if t.await.expect("task").expect("add").is_some() {
            added += 1;
        }
    }
    assert_eq!(added, 10);
    assert_eq!(store.add_to_total("spend:z", 1, 100, 3).await.expect("add"), None);

    // Pruning: buckets emptied at 100 (one token, no refill), totals at 0 and 50.
    let one = Bucket {
        capacity: 1,
        refill_milli_per_second: 0,
    };
    for key in ["rate:p:old", "rate:pp:old", "rate:q:old"] {
        assert!(store.take_token(key, one, 100).await.expect("take"));
    }
    assert!(store.take_token("rate:p:new", one, 300).await.expect("take"));
    store.add_to_total("spend:old", 7, 100, 0).await.expect("add");
    store.add_to_total("spend:new", 7, 100, 50).await.expect("add");
    // Totals changed before 1 (spend:x..z changed at 2 and 3 stay); "rate:p:" buckets before 200.
    let gone = store
        .prune_limit_counters(1, &[("rate:p:".to_string(), 200)])
        .await
        .expect("prune");
    assert_eq!(gone, 2, "spend:old and rate:p:old");
    assert!(
        store.take_token("rate:p:old", one, 300).await.expect("take"),
        "pruned: full again"
    );
    assert!(
        !store.take_token("rate:p:new", one, 300).await.expect("take"),
        "changed after the cut"
    );
    assert!(
        !store.take_token("rate:pp:old", one, 300).await.expect("take"),
        "another prefix"
    );
    assert!(
        !store.take_token("rate:q:old", one, 300).await.expect("take"),
        "another rate"
    );
    assert_eq!(store.add_to_total("spend:old", 0, 100, 60).await.expect("add"), Some(0));
    assert_eq!(store.add_to_total("spend:new", 0, 100, 60).await.expect("add"), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = sqlite_url_in(dir.path());
    let store = open(&url).await.expect("open");
    suite(store.clone()).await;
    store.close().await;
    let store = open(&url).await.expect("reopen");
    assert_eq!(
        store.add_to_total("spend:x", 1, 100, 4).await.expect("add"),
        None,
        "kept across reopening"
    );
    assert!(
        !store.take_token("rate:c", NO_REFILL, 100).await.expect("take"),
        "kept across reopening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_postgres() {
    let Some(schema) = PgTestSchema::create() else { return };
    let store = open(schema.url()).await.expect("open");
    suite(store.clone()).await;
    store.close().await;
    let store = open(schema.url()).await.expect("reopen");
    assert_eq!(
        store.add_to_total("spend:x", 1, 100, 4).await.expect("add"),
        None,
        "kept across reopening"
    );
}
