//! Issuer key lifecycle rows, on every backend (SQLite in a temp dir, PostgreSQL in a fresh
//! schema, skipped loudly when no server answers outside CI).

use std::sync::Arc;

use super::testing::{sqlite_url_in, PgTestSchema};
use super::*;

enum Place {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Schema(#[allow(dead_code)] PgTestSchema),
}

async fn sqlite() -> Option<(Arc<dyn Store>, Place)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&sqlite_url_in(dir.path())).await.expect("open");
    Some((store, Place::Dir(dir)))
}

async fn postgres() -> Option<(Arc<dyn Store>, Place)> {
    let schema = PgTestSchema::create()?;
    let store = open(schema.url()).await.expect("open");
    Some((store, Place::Schema(schema)))
}

pub(super) fn rec(kid: &str, alg: &str, state: IssuerKeyState, now: i64) -> IssuerKeyRecord {
    IssuerKeyRecord {
        kid: kid.into(),
        alg: alg.into(),
        label: format!("keyward-issuer-{alg}-{kid}"),
        state,
        created_at: now,
        activated_at: (state == IssuerKeyState::Active).then_some(now),
        retired_at: None,
        revoked_at: None,
        jwk: format!(r#"{{"kid":"{kid}"}}"#),
        wrapped: Some(format!("blob-{kid}").into_bytes()),
        kek_version: Some(1),
    }
}

fn blob_of(keys: &[IssuerKeyRecord], kid: &str) -> Option<(Vec<u8>, u32)> {
    let k = keys.iter().find(|k| k.kid == kid)?;
    Some((k.wrapped.clone()?, k.kek_version?))
}

fn state_of(keys: &[IssuerKeyRecord], kid: &str) -> Option<IssuerKeyState> {
    keys.iter().find(|k| k.kid == kid).map(|k| k.state)
}

async fn transitions(store: Arc<dyn Store>) {
    assert!(store.list_issuer_keys().await.unwrap().is_empty());
    assert!(store
        .add_issuer_key(&rec("a1", "EdDSA", IssuerKeyState::Active, 100))
        .await
        .unwrap());
    assert!(!store
        .add_issuer_key(&rec("a2", "EdDSA", IssuerKeyState::Active, 100))
        .await
        .unwrap());
    assert!(store
        .add_issuer_key(&rec("n1", "EdDSA", IssuerKeyState::Next, 100))
        .await
        .unwrap());
    assert!(!store
        .add_issuer_key(&rec("n2", "EdDSA", IssuerKeyState::Next, 100))
        .await
        .unwrap());
    assert!(store
        .add_issuer_key(&rec("e1", "ES256", IssuerKeyState::Active, 100))
        .await
        .unwrap());
    assert!(store
        .add_issuer_key(&rec("x", "EdDSA", IssuerKeyState::Retired, 100))
        .await
        .is_err());
    let keys = store.list_issuer_keys().await.unwrap();
    assert_eq!(keys.len(), 3);
    assert_eq!(
        keys.iter().find(|k| k.kid == "a1"),
        Some(&rec("a1", "EdDSA", IssuerKeyState::Active, 100))
    );

    // Too early: nothing changes.
    assert_eq!(
        store.promote_issuer_key("EdDSA", 150, 60, None).await.unwrap(),
        PromoteOutcome::TooEarly {
            kid: "n1".into(),
            ready_at: 160
        }
    );
    // Scheduled, not due yet.
    assert_eq!(
        store.promote_issuer_key("EdDSA", 500, 60, Some(50)).await.unwrap(),
        PromoteOutcome::NotDue
    );
    assert_eq!(
        store.promote_issuer_key("ES256", 500, 60, None).await.unwrap(),
        PromoteOutcome::NoNext
    );
    assert_eq!(
        store.promote_issuer_key("EdDSA", 160, 60, None).await.unwrap(),
        PromoteOutcome::Promoted {
            kid: "n1".into(),
            retired: Some("a1".into())
        }
    );
    let keys = store.list_issuer_keys().await.unwrap();
    assert_eq!(state_of(&keys, "a1"), Some(IssuerKeyState::Retired));
    assert_eq!(state_of(&keys, "n1"), Some(IssuerKeyState::Active));
    let n1 = keys.iter().find(|k| k.kid == "n1").unwrap();
    assert_eq!(n1.activated_at, Some(160));
    assert_eq!(keys.iter().find(|k| k.kid == "a1").unwrap().retired_at, Some(160));
    // The retired key's blob is destroyed with its promotion; the active one keeps its own.
    assert_eq!(blob_of(&keys, "a1"), None);
    assert_eq!(
        keys.iter().find(|k| k.kid == "a1").unwrap().kek_version,
        Some(1),
        "kept: a stored key"
    );
    assert_eq!(blob_of(&keys, "n1"), Some((b"blob-n1".to_vec(), 1)));
    assert_eq!(store.issuer_keys_per_kek().await.unwrap(), vec![(1, 2)]);
    // A rewrap moves a blob only from the version it is under.
    assert!(!store.replace_issuer_blob("n1", 2, b"moved", 3).await.unwrap());
    assert!(!store.replace_issuer_blob("a1", 1, b"moved", 3).await.unwrap());
    assert!(store.replace_issuer_blob("e1", 1, b"moved-e1", 2).await.unwrap());
    let keys = store.list_issuer_keys().await.unwrap();
    assert_eq!(blob_of(&keys, "e1"), Some((b"moved-e1".to_vec(), 2)));
    assert_eq!(store.issuer_keys_per_kek().await.unwrap(), vec![(1, 1), (2, 1)]);

    // Revoking the active key promotes the next one at once (no age rule).
    assert!(store
        .add_issuer_key(&rec("n3", "EdDSA", IssuerKeyState::Next, 200))
        .await
        .unwrap());
    let out = store.revoke_issuer_key("n1", 201).await.unwrap().unwrap();
    assert_eq!(out.before.state, IssuerKeyState::Active);
    assert_eq!(out.promoted.as_deref(), Some("n3"));
    let keys = store.list_issuer_keys().await.unwrap();
    assert_eq!(state_of(&keys, "n1"), Some(IssuerKeyState::Revoked));
    assert_eq!(keys.iter().find(|k| k.kid == "n1").unwrap().revoked_at, Some(201));
    assert_eq!(blob_of(&keys, "n1"), None, "a revoked key's blob is destroyed");
    assert_eq!(state_of(&keys, "n3"), Some(IssuerKeyState::Active));
    // Idempotent.
    let again = store.revoke_issuer_key("n1", 300).await.unwrap().unwrap();
    assert_eq!(again.before.state, IssuerKeyState::Revoked);
    assert_eq!(again.before.revoked_at, Some(201));
    assert_eq!(again.promoted, None);
    assert!(store.revoke_issuer_key("nope", 300).await.unwrap().is_none());

    // Deletion: only retired or revoked rows.
    assert!(!store.delete_issuer_key("n3").await.unwrap());
    assert!(store.delete_issuer_key("a1").await.unwrap());
    assert!(!store.delete_issuer_key("a1").await.unwrap());
    let keys = store.list_issuer_keys().await.unwrap();
    assert_eq!(state_of(&keys, "a1"), None);
    store.close().await;
}

async fn concurrent_rotations(store: Arc<dyn Store>) {
    for round in 0..5i64 {
        let t = round * 1000;
        if round == 0 {
            assert!(store
                .add_issuer_key(&rec("k0", "ES256", IssuerKeyState::Active, t))
                .await
                .unwrap());
        }
        let next = format!("k{}", round + 1);
        assert!(store
            .add_issuer_key(&rec(&next, "ES256", IssuerKeyState::Next, t))
            .await
            .unwrap());
        let mut tasks = Vec::new();
        for i in 0..4 {
            let s = store.clone();
            // Half on demand, half scheduled.
            let due = (i % 2 == 0).then_some(t + 500);
            tasks.push(tokio::spawn(async move {
                s.promote_issuer_key("ES256", t + 500, 100, due).await
            }));
        }
        let mut promoted = 0;
        for task in tasks {
            if let PromoteOutcome::Promoted { kid, .. } = task.await.unwrap().unwrap() {
                assert_eq!(kid, next);
                promoted += 1;
            }
        }
        assert_eq!(promoted, 1, "exactly one rotation wins");
        let keys = store.list_issuer_keys().await.unwrap();
        let active: Vec<_> = keys.iter().filter(|k| k.state == IssuerKeyState::Active).collect();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].kid, next);
    }
    // Concurrent adds of a next key: one wins.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.add_issuer_key(&rec(&format!("race{i}"), "ES256", IssuerKeyState::Next, 9000))
                .await
        }));
    }
    let mut added = 0;
    for task in tasks {
        added += usize::from(task.await.unwrap().unwrap());
    }
    assert_eq!(added, 1);
    store.close().await;
}

macro_rules! both {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let Some((store, _place)) = super::sqlite().await else {
                    return;
                };
                super::$case(store).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                let Some((store, _place)) = super::postgres().await else {
                    return;
                };
                super::$case(store).await;
            }
        }
    };
}

both!(transitions);
both!(concurrent_rotations);

/// Runs `sql` on a fresh connection to `url`; the database's answer.
async fn raw(url: &str, sql: &str) -> Result<(), sqlx::Error> {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await?;
        let r = sqlx::raw_sql(sql).execute(&pool).await.map(|_| ());
        pool.close().await;
        r
    } else {
        let pool = sqlx::PgPool::connect(url).await?;
        let r = sqlx::raw_sql(sql).execute(&pool).await.map(|_| ());
        pool.close().await;
        r
    }
}

/// The history keeps every key with its first times, after its `issuer_keys` row is deleted,
/// and the database refuses to delete or rewrite it.
async fn history_outlives_rows(url: &str) {
    let store = open(url).await.expect("open");
    store
        .add_issuer_key(&rec("a1", "EdDSA", IssuerKeyState::Active, 100))
        .await
        .unwrap();
    store
        .add_issuer_key(&rec("n1", "EdDSA", IssuerKeyState::Next, 100))
        .await
        .unwrap();
    store.promote_issuer_key("EdDSA", 200, 60, None).await.unwrap();
    store
        .add_issuer_key(&rec("n2", "EdDSA", IssuerKeyState::Next, 210))
        .await
        .unwrap();
    store.revoke_issuer_key("n1", 300).await.unwrap();
    store.revoke_issuer_key("n1", 400).await.unwrap();
    assert!(store.delete_issuer_key("a1").await.unwrap());
    assert!(store.delete_issuer_key("n1").await.unwrap());
    let h = store.issuer_key_history().await.unwrap();
    let row = |kid: &str| h.iter().find(|r| r.kid == kid).cloned().expect("history row");
    assert_eq!(h.len(), 3, "{h:?}");
    let a1 = row("a1");
    assert_eq!(
        (a1.created_at, a1.activated_at, a1.retired_at, a1.revoked_at),
        (100, Some(100), Some(200), None)
    );
    assert_eq!(a1.jwk, r#"{"kid":"a1"}"#);
    let n1 = row("n1");
    assert_eq!(
        (n1.created_at, n1.activated_at, n1.retired_at, n1.revoked_at),
        (100, Some(200), None, Some(300)),
        "the first revocation time stays"
    );
    let n2 = row("n2");
    assert_eq!((n2.activated_at, n2.revoked_at), (Some(300), None));
    for sql in [
        "DELETE FROM issuer_key_history WHERE kid = 'a1'",
        "UPDATE issuer_key_history SET jwk = '{}' WHERE kid = 'a1'",
        "UPDATE issuer_key_history SET created_at = 0 WHERE kid = 'a1'",
    ] {
        let e = raw(url, sql).await.expect_err(sql);
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }
    assert_eq!(store.issuer_key_history().await.unwrap(), h);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_outlives_rows_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    history_outlives_rows(&sqlite_url_in(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_outlives_rows_postgres() {
    let Some(schema) = PgTestSchema::create() else {
        return;
    };
    history_outlives_rows(schema.url()).await;
}

/// The account change feed: a change is read back by time; old rows are pruned.
async fn change_feed(store: Arc<dyn Store>) {
    let mut rec = super::tests::record("5d7c2a4e-1111-4222-8333-444455556666");
    rec.keys.clear();
    store.create_account(&rec).await.unwrap();
    let freeze = AccountChange {
        frozen: Some(Some(Frozen {
            at: 1,
            reason: "r".into(),
        })),
        ..AccountChange::default()
    };
    assert_eq!(
        store
            .change_account_audited(&rec.id, &freeze, 1_000, None)
            .await
            .unwrap(),
        (true, None)
    );
    assert_eq!(
        store
            .change_account_audited("00000000-0000-4000-8000-000000000000", &freeze, 1_000, None)
            .await
            .unwrap(),
        (false, None),
        "no such account: nothing written"
    );
    store
        .change_account_audited(&rec.id, &AccountChange::default(), 5_000, None)
        .await
        .unwrap();
    let all = store.account_changes_since(0).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|(_, id)| id == &rec.id));
    assert_eq!(store.account_changes_since(2_000).await.unwrap().len(), 1);
    assert_eq!(
        store
            .get_account(&rec.id)
            .await
            .unwrap()
            .unwrap()
            .frozen
            .map(|f| f.reason),
        Some("r".into())
    );
    assert_eq!(store.prune_account_changes(2_000).await.unwrap(), 1);
    assert_eq!(store.account_changes_since(0).await.unwrap(), all[1..].to_vec());
    store.close().await;
}

both!(change_feed);
