//! Persistent state behind one narrow trait; SQLite (embedded default) and
//! PostgreSQL. Never holds a plaintext private key: an account's keys are
//! stored only as blobs wrapped under the HSM's key-encryption key.
//!
//! [`open`] picks the backend from the URL scheme and runs the migrations
//! under `migrations/sqlite` or `migrations/postgres`.

use std::fmt;
use std::sync::Arc;

use crate::types::KeyAlg;

pub(crate) mod dialect;
pub mod limits;
mod postgres;
mod shared;
mod sqlite;
pub mod testing;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_audit;
#[cfg(test)]
mod tests_audit_txn;
#[cfg(test)]
mod tests_jwks;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_receipts;
#[cfg(test)]
mod tests_retention;

pub use postgres::PgStore;
pub use shared::SqlStore;
pub use sqlite::SqliteStore;

/// One custodial account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    /// Opaque account id (a UUID for accounts the daemon creates).
    pub id: String,
    /// Free-form label, if any.
    pub label: Option<String>,
    /// The controller's `0x` EIP-55 address, as given.
    pub controller: String,
    /// The mTLS identity that created the account.
    pub created_by: String,
    /// Creation time, unix seconds UTC.
    pub created_at: i64,
    /// Identities that may have this account sign, besides `created_by`
    /// (sorted and without duplicates when read back).
    pub allowed: Vec<String>,
    /// The account's keys (ordered by algorithm name, then key version, when
    /// read back).
    pub keys: Vec<KeyRecord>,
    /// Set while the account is frozen: it signs nothing, sessions included.
    pub frozen: Option<Frozen>,
    /// When the account was deleted (its private keys destroyed), if it was.
    pub deleted_at: Option<i64>,
}

/// Why and since when an account is frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    /// Since when, unix seconds.
    pub at: i64,
    /// The operator's reason.
    pub reason: String,
}

/// What [`Store::change_account_audited`] changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountChange {
    /// The new label (`Some(None)` clears it).
    pub label: Option<Option<String>>,
    /// The new set of allowed identities (replacing the old).
    pub allowed: Option<Vec<String>>,
    /// Freeze (`Some(Some(..))`) or unfreeze (`Some(None)`).
    pub frozen: Option<Option<Frozen>>,
    /// Delete at this time: the wrapped private keys are emptied (KEK version 0), open
    /// sessions revoked, a pending controller change cancelled; the row and the public keys
    /// stay.
    pub deleted_at: Option<i64>,
    /// A new version of the account's keys (rotation); stored only if no key of that
    /// version exists yet (else [`StoreError::Conflict`]).
    pub new_keys: Option<Vec<KeyRecord>>,
}

/// A change of an account's controller wallet (`controller_changes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerChangeRecord {
    /// A UUID.
    pub id: String,
    /// The account.
    pub account_id: String,
    /// The controller when it was asked for (EIP-55).
    pub old_controller: String,
    /// The controller it makes (EIP-55).
    pub new_controller: String,
    /// Who asked: the relaying client's identity.
    pub requested_by: String,
    /// When, unix seconds.
    pub requested_at: i64,
    /// When it takes effect, unless cancelled first.
    pub effective_at: i64,
    /// The signing hash of the controller's ControllerChange document (hex), if signed.
    pub digest: Option<String>,
    /// `pending`, `applied` or `cancelled`.
    pub state: String,
    /// When it was applied or cancelled.
    pub settled_at: Option<i64>,
}

/// Which accounts [`Store::list_account_ids`] lists; empty fields match every account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountFilter {
    /// Exactly this label.
    pub label: Option<String>,
    /// This controller address (any letter case).
    pub controller: Option<String>,
    /// Created by this identity.
    pub created_by: Option<String>,
    /// Deleted accounts too.
    pub include_deleted: bool,
}

/// One wrapped account key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's algorithm.
    pub alg: KeyAlg,
    /// The public key, in the algorithm's usual encoding.
    pub public_key: Vec<u8>,
    /// The private key wrapped under the key-encryption key.
    pub wrapped: Vec<u8>,
    /// The version of the key-encryption key that wrapped it.
    pub kek_version: u32,
    /// The version of this account key.
    pub key_version: u32,
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("alg", &self.alg)
            .field("public_key", &hex::encode(&self.public_key))
            .field("wrapped", &format_args!("<{} bytes>", self.wrapped.len()))
            .field("kek_version", &self.kek_version)
            .field("key_version", &self.key_version)
            .finish()
    }
}

/// A session challenge (an EIP-712 `SessionGrant`) waiting for the
/// controller's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeRecord {
    /// Opaque challenge id.
    pub id: String,
    /// The account the session would act for.
    pub account_id: String,
    /// The identity the session would be delegated to.
    pub delegate: String,
    /// What the session may do, in order.
    pub scopes: Vec<String>,
    /// The most the session may spend in total.
    pub cap: u128,
    /// The grant's random nonce.
    pub nonce: [u8; 32],
    /// The typed-data JSON served to the wallet, stored verbatim.
    pub typed_data: String,
    /// Issue time, unix seconds UTC.
    pub issued_at: i64,
    /// The challenge can be used while `now < expires_at` (unix seconds).
    pub expires_at: i64,
}

/// Where a page of sessions starts: after this session (the last of the
/// previous page), in the order of [`Store::list_sessions_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCursor {
    /// The session's issue time.
    pub issued_at: i64,
    /// The session's id.
    pub id: String,
}

impl SessionCursor {
    /// The cursor after `s`.
    pub fn after(s: &SessionRecord) -> SessionCursor {
        SessionCursor {
            issued_at: s.issued_at,
            id: s.id.clone(),
        }
    }
}

/// What a retention prune ([`Store::prune_sessions`]) deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Ended sessions (with their spends).
    pub sessions: u64,
    /// Challenges: those of the deleted sessions and unopened expired ones.
    pub challenges: u64,
}

/// A delegated session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Opaque session id.
    pub id: String,
    /// The account the session acts for.
    pub account_id: String,
    /// The identity the session is delegated to.
    pub delegate: String,
    /// What the session may do, in order.
    pub scopes: Vec<String>,
    /// The most the session may spend in total.
    pub cap: u128,
    /// What is left of `cap` (pending spends count as spent).
    pub remaining: u128,
    /// How many spends were reserved (released ones included): the last
    /// spend nonce handed out.
    pub uses: u64,
    /// Issue time, unix seconds UTC.
    pub issued_at: i64,
    /// The session can spend while `now < expires_at` (unix seconds).
    pub expires_at: i64,
    /// The challenge that opened the session.
    pub challenge_id: String,
    /// The id of the token issued for the session.
    pub jti: String,
    /// When the session was first revoked, unix seconds UTC.
    pub revoked_at: Option<i64>,
    /// Who first revoked the session.
    pub revoked_by: Option<String>,
    /// The scope grammar it was opened under (1: before assets; see
    /// [`crate::session::SCOPE_GRAMMAR`]).
    pub scope_grammar: u8,
}

/// What [`Store::open_session`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenOutcome {
    /// The challenge was consumed and the session stored.
    Opened,
    /// No challenge has this id.
    ChallengeNotFound,
    /// The challenge already opened a session.
    ChallengeUsed,
    /// The challenge expired before it was used.
    ChallengeExpired,
    /// The account already has this many unrevoked, unexpired sessions,
    /// as many as the limit allows; nothing changed.
    TooManyOpen(u64),
}

/// One spend to reserve under a session (see [`Store::reserve_spend`]).
#[derive(Debug, Clone)]
pub struct SpendRequest<'a> {
    /// The session to spend under.
    pub session_id: &'a str,
    /// The caller's idempotency key, unique within the session.
    pub request_id: &'a str,
    /// A hash of the request body, to tell a retry from a different request
    /// reusing the id.
    pub body_hash: [u8; 32],
    /// How much the spend takes from the session's `remaining`, or adds to
    /// its asset's spent total.
    pub amount: u128,
    /// The asset and its own cap when the spend counts against that cap
    /// (a `cap:<asset>:` scope) rather than the session's.
    pub asset_cap: Option<(&'a str, u128)>,
    /// A second part reserved with it, all or nothing: a transaction's gas
    /// when it moves another asset than the one gas is paid in.
    pub fee: Option<SpendPart<'a>>,
    /// The current time, unix seconds UTC.
    pub now: i64,
}

/// One part of a spend: how much, and against which cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendPart<'a> {
    /// Minor units.
    pub amount: u128,
    /// The asset and its own cap; `None`: the session's cap.
    pub asset_cap: Option<(&'a str, u128)>,
}

/// Builds a spend's audit event from the nonce its reservation is given
/// (a payment's signed document includes the nonce, so its digest is known
/// only then). Called inside the reserving transaction.
pub type SpendEvent<'a> = &'a (dyn Fn(u64) -> crate::audit::NewEvent + Send + Sync);

/// A pending spend (see [`Store::stale_spends`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSpend {
    /// The session it was reserved under.
    pub session_id: String,
    /// The session's account.
    pub account_id: String,
    /// The request's idempotency key.
    pub request_id: String,
    /// When it was reserved, unix seconds UTC.
    pub created_at: i64,
}

/// One stored spend ([`Store::get_spend`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRecord {
    /// The amount it took from the cap.
    pub amount: u128,
    /// The encoded response of the completed request; `None` while pending.
    pub response: Option<Vec<u8>>,
}

/// What [`Store::reserve_spend`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpendOutcome {
    /// The amount was taken from the session and a pending spend stored.
    Reserved {
        /// What is left of the cap afterwards.
        remaining: u128,
        /// The session's `uses` after the increment: 1, 2, ... (never reused).
        nonce: u64,
    },
    /// The same request (same id and body) already completed: its response.
    Replay {
        /// The response stored by [`Store::complete_spend`].
        response: Vec<u8>,
    },
    /// The same request (same id and body) is reserved but not completed.
    InProgress,
    /// The request id was already used with a different body.
    BodyMismatch,
    /// The amount exceeds what is left; nothing changed.
    Insufficient {
        /// What is left of the cap.
        remaining: u128,
        /// The asset whose own cap it is; `None`: the session's cap.
        asset: Option<String>,
        /// What the request needed from that cap.
        requested: u128,
    },
    /// The session was revoked.
    Revoked,
    /// The session expired (`now >= expires_at`).
    Expired,
    /// No session has this id.
    NotFound,
}

/// Why a store operation failed. Messages never contain a password from a
/// connection URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or used right now (connect, IO, pool
    /// timeout, busy, disk full); retrying later may help.
    #[error("{backend} store unavailable: {reason}")]
    Unavailable {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// A row with the same unique key already exists.
    #[error("{what} already exists")]
    Conflict {
        /// What collided, e.g. `account 1234`.
        what: String,
    },
    /// A stored row does not decode (e.g. an unknown key algorithm).
    #[error("corrupt store row: {what}")]
    Corrupt {
        /// Which row and why.
        what: String,
    },
    /// The schema migrations failed.
    #[error("{backend} store migration failed: {reason}")]
    Migration {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
    /// The store URL is malformed or names no supported backend.
    #[error("invalid store URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database rejected a statement for another reason (a bug or a
    /// schema that does not match this build); retrying will not help.
    #[error("{backend} store error: {reason}")]
    Backend {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The database's message.
        reason: String,
    },
}

/// The persistent state of the daemon.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// The audit log's view of this store.
    fn audit(&self) -> &dyn crate::audit::AuditStore;

    /// Checks the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores the account, its keys and its grants in one transaction. An
    /// existing id gives [`StoreError::Conflict`] and writes nothing.
    async fn create_account(&self, rec: &AccountRecord) -> Result<(), StoreError> {
        self.create_account_audited(rec, None).await.map(|_| ())
    }

    /// As [`Store::create_account`]; also appends `event` (the request's
    /// audit event, naming the account) to the audit log in the same
    /// transaction and returns its seq. A conflict writes neither.
    async fn create_account_audited(
        &self,
        rec: &AccountRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError>;

    /// The account, or `None` if no account has this id. Keys come ordered
    /// by algorithm name (then key version); `allowed` comes sorted.
    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;

    /// How many accounts exist.
    async fn count_accounts(&self) -> Result<u64, StoreError>;

    /// Stores a challenge. An existing id gives [`StoreError::Conflict`].
    async fn create_challenge(&self, c: &ChallengeRecord) -> Result<(), StoreError>;

    /// The challenge and when it was consumed (if it was), or `None` if no
    /// challenge has this id.
    async fn get_challenge(&self, id: &str) -> Result<Option<(ChallengeRecord, Option<i64>)>, StoreError>;

    /// In one transaction: consumes the challenge (sets its `consumed_at`
    /// to `now`) if it exists, is unconsumed and `now < expires_at`, and
    /// stores `session`; otherwise changes nothing and says why. Of
    /// concurrent opens of one challenge exactly one gets
    /// [`OpenOutcome::Opened`]. `session.challenge_id` must equal
    /// `challenge_id` (else [`StoreError::Backend`]); an existing session
    /// id gives [`StoreError::Conflict`] and consumes nothing.
    async fn open_session(
        &self,
        challenge_id: &str,
        now: i64,
        session: &SessionRecord,
    ) -> Result<OpenOutcome, StoreError> {
        Ok(self
            .open_session_audited(challenge_id, now, session, None, None)
            .await?
            .0)
    }

    /// As [`Store::open_session`]; with `max_open`, refuses with
    /// [`OpenOutcome::TooManyOpen`] (consuming nothing) when the account
    /// already has that many sessions neither revoked nor expired at `now`,
    /// counted in the same transaction, so concurrent opens on any replica
    /// never pass the limit. When the session is opened, also appends
    /// `event` to the audit log in that transaction and returns its seq.
    async fn open_session_audited(
        &self,
        challenge_id: &str,
        now: i64,
        session: &SessionRecord,
        max_open: Option<u64>,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(OpenOutcome, Option<u64>), StoreError>;

    /// The session, or `None` if no session has this id.
    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;

    /// One page of the account's sessions, newest first (`issued_at`
    /// descending, then `id` in byte order): at most `limit`, starting after
    /// `after` (the last session of the previous page). One range of the
    /// `(account_id, issued_at, id)` index.
    async fn list_sessions_page(
        &self,
        account_id: &str,
        after: Option<&SessionCursor>,
        limit: u32,
    ) -> Result<Vec<SessionRecord>, StoreError>;

    /// Every session of the account, newest first, read page by page: for
    /// tools and tests. A request reads one page ([`Store::list_sessions_page`]).
    async fn list_sessions(&self, account_id: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let mut all: Vec<SessionRecord> = Vec::new();
        loop {
            let after = all.last().map(SessionCursor::after);
            let page = self.list_sessions_page(account_id, after.as_ref(), 500).await?;
            let done = page.len() < 500;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// How many of the account's sessions are open at `now` (neither
    /// revoked nor expired): a count over one range of the `sessions_open`
    /// index, whatever the number of ended sessions.
    async fn count_open_sessions(&self, account_id: &str, now: i64) -> Result<u64, StoreError>;

    /// Retention: deletes the sessions that ended before `before` (expired
    /// before it, or revoked before it and expired by `now`: a revoked
    /// token is answered as revoked until it expires) with their spends and
    /// the challenges that opened them, and the challenges that expired
    /// before `before` without opening a session. Works in transactions of
    /// at most `batch` rows, found through the time indexes. Returns what went.
    async fn prune_sessions(&self, before: i64, now: i64, batch: u32) -> Result<Pruned, StoreError>;

    /// Revokes the session, keeping the first revocation's time and
    /// identity if it was already revoked. Returns the session as it is
    /// afterwards, or `None` if no session has this id.
    async fn revoke_session(&self, id: &str, by: &str, now: i64) -> Result<Option<SessionRecord>, StoreError>;

    /// In one transaction, checking in this order: the session exists
    /// ([`SpendOutcome::NotFound`]); a spend with this request id exists
    /// (`Replay`, `InProgress` or `BodyMismatch`; nothing changed); the
    /// session is revoked (`Revoked`); `now >= expires_at` (`Expired`);
    /// `amount > remaining` (`Insufficient`). Otherwise takes `amount` from
    /// `remaining`, increments `uses` and stores a pending spend whose nonce
    /// is the new `uses`.
    async fn reserve_spend(&self, r: &SpendRequest<'_>) -> Result<SpendOutcome, StoreError> {
        Ok(self.reserve_spend_audited(r, None).await?.0)
    }

    /// As [`Store::reserve_spend`]; when the spend is reserved, also appends
    /// the event `event` builds from the spend's nonce (the request's audit
    /// event: it is recorded before anything is signed) in the same
    /// transaction and returns its seq. Any other outcome appends nothing.
    async fn reserve_spend_audited(
        &self,
        r: &SpendRequest<'_>,
        event: Option<SpendEvent<'_>>,
    ) -> Result<(SpendOutcome, Option<u64>), StoreError>;

    /// Stores the response of a pending spend. A no-op if the spend is
    /// missing or already completed (the first response is kept). Appends
    /// no audit event: the request's event was appended with the
    /// reservation.
    ///
    /// Returns whether this call stored the response: false when the spend
    /// is gone (released by [`Store::stale_spends`]' recovery sweep because
    /// signing outlasted the recovery bound) or was already completed. A
    /// caller holding a signature must not hand it out when this is false:
    /// the amount may have been given back to the session.
    async fn complete_spend(&self, session_id: &str, request_id: &str, response: &[u8]) -> Result<bool, StoreError>;

    /// One spend of a session: its amount and, once completed, the response it gave (a
    /// receipt names the payment it is for by its request id).
    async fn get_spend(&self, session_id: &str, request_id: &str) -> Result<Option<SpendRecord>, StoreError>;

    /// What the session's spends under an asset's own cap add up to, by
    /// asset (pending ones included), in asset order.
    async fn session_asset_spent(&self, session_id: &str) -> Result<Vec<(String, u128)>, StoreError>;

    /// Spends still pending (reserved, neither completed nor released) that
    /// were reserved before `before` (unix seconds), oldest first, at most
    /// `limit`: what the recovery sweep releases (a request that died between
    /// its reservation and its completion: a crash, a store error at
    /// completion).
    async fn stale_spends(&self, before: i64, limit: u32) -> Result<Vec<PendingSpend>, StoreError>;

    /// A write the store must be able to make for the daemon to be ready:
    /// takes the write lock (SQLite) or a row lock (PostgreSQL), writes the
    /// heartbeat row and commits. Fails while the database is unreachable,
    /// locked by another holder, or cannot write (disk full, read-only).
    async fn probe_write(&self, now: i64) -> Result<(), StoreError>;

    /// Signing failed: deletes the pending spend and gives its amount back
    /// to the session's `remaining`, or to its asset's cap (`uses` stays, so
    /// nonces are never reused). A no-op if the spend is missing or completed.
    async fn release_spend(&self, session_id: &str, request_id: &str) -> Result<(), StoreError> {
        self.release_spend_audited(session_id, request_id, None)
            .await
            .map(|_| ())
    }

    /// As [`Store::release_spend`]; when a pending spend is released, also
    /// appends `event` (the compensating `ReleaseSpend` event) in the same
    /// transaction and returns its seq.
    async fn release_spend_audited(
        &self,
        session_id: &str,
        request_id: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError>;

    /// The connection pool's state now.
    fn pool_stats(&self) -> PoolStats;

    /// What the store measures of its transactions.
    fn tx_stats(&self) -> &TxStats;

    /// Where the store is one SQLite file with an in-process writer lock:
    /// the file and that lock, so that the audit log's writer thread can
    /// append on a connection of its own, serialised with every other write
    /// (see [`crate::audit::writer`]). `None` for a server database.
    fn direct_audit(&self) -> Option<crate::audit::writer::DirectAudit> {
        None
    }

    /// Closes the connection pool, waiting for connections in use to be
    /// returned. Later calls fail with [`StoreError::Unavailable`].
    async fn close(&self);

    // ----- Receipts (issue 5: receipts and attestations) -----------------

    /// In one transaction: if a receipt with `(account_id, caller,
    /// request_id)` exists (idempotency keys are the caller's own), answers `Replay` (same `body_hash`) or `BodyMismatch` and
    /// changes nothing; otherwise assigns the next audit sequence number,
    /// calls `sign(seq)` and stores the receipt it returns with its seq.
    /// If signing fails nothing is stored (`SignFailed`); if the commit
    /// fails the error is returned and the signed receipt is dropped.
    async fn record_receipt(&self, r: &NewReceipt<'_>, sign: ReceiptSigner) -> Result<ReceiptOutcome, StoreError>;

    /// The receipt `caller` recorded for `(account_id, request_id)`, if any.
    async fn get_receipt(
        &self,
        account_id: &str,
        caller: &str,
        request_id: &str,
    ) -> Result<Option<ReceiptRecord>, StoreError>;
    // ----- end receipts ------------------------------------------------------

    // ---- Issuer keys (JWKS lifecycle, issue 5) ----

    /// Stores a KEK backup with its audit event, in one transaction.
    async fn add_kek_backup_audited(
        &self,
        rec: &KekBackupRecord,
        event: &crate::audit::NewEvent,
    ) -> Result<u64, StoreError>;

    /// A KEK backup by id, or the newest one (`None`).
    async fn get_kek_backup(&self, id: Option<&str>) -> Result<Option<KekBackupRecord>, StoreError>;

    /// Up to `limit` account ids after `after` (None: from the first), ascending.
    async fn account_ids_page(&self, after: Option<&str>, limit: u32) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` ids of the accounts `filter` matches, after `after`, ascending.
    async fn list_account_ids(
        &self,
        filter: &AccountFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError>;

    /// Applies `change` to account `id` in one transaction with its `account_changes` row
    /// (`changed_at`: wall-clock unix seconds) and `event`. Returns false (nothing written)
    /// if there is no such account, and the appended event's seq.
    async fn change_account_audited(
        &self,
        id: &str,
        change: &AccountChange,
        changed_at: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError>;

    /// Records a controller change with `event`, in one transaction that also checks the
    /// account still has `rec.old_controller` and no change pending (else
    /// [`StoreError::Conflict`], as for a document already used). A change due at once
    /// (`effective_at <= requested_at`) is applied in the same transaction (see
    /// [`Store::apply_due_controller_changes`]); `changed_at` is the wall clock for the
    /// account change feed. Returns the event's seq.
    async fn request_controller_change_audited(
        &self,
        rec: &ControllerChangeRecord,
        changed_at: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError>;

    /// Cancels the account's pending controller change at `now` (only if its id is `only`,
    /// when given), with `event`: the change as cancelled, or `None` if none was pending.
    async fn cancel_controller_change_audited(
        &self,
        account_id: &str,
        only: Option<&str>,
        now: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(Option<ControllerChangeRecord>, Option<u64>), StoreError>;

    /// Applies every pending controller change due at `now`, each in its own transaction with
    /// a copy of `event` naming its account: the account gets the new controller, its open
    /// sessions (granted by the old controller) are revoked, the change is marked applied and
    /// the account change feed told. Idempotent across replicas. Returns what it applied.
    async fn apply_due_controller_changes(
        &self,
        now: i64,
        changed_at: i64,
        event: &crate::audit::NewEvent,
    ) -> Result<Vec<ControllerChangeRecord>, StoreError>;

    /// Records an import job (`id`, by `created_by`, usable until `expires_at`) with `event`.
    async fn create_import_job_audited(
        &self,
        id: &str,
        created_by: &str,
        created_at: i64,
        expires_at: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<Option<u64>, StoreError>;

    /// Whether import job `id` can still be taken at `now` (known, unused, not expired).
    async fn import_job_open(&self, id: &str, now: i64) -> Result<bool, StoreError>;

    /// Takes import job `id` for one import at `now`: `Ok(None)` if taken now, else why not
    /// (no such job, used, or expired). A job is taken once, whatever races.
    async fn take_import_job(&self, id: &str, now: i64) -> Result<Option<String>, StoreError>;

    /// Deletes the account change feed's rows older than `before` (wall-clock unix seconds):
    /// replicas read only its last seconds. Returns how many went.
    async fn prune_account_changes(&self, before: i64) -> Result<u64, StoreError>;

    /// The `(seq, account id)` of every account change at or after `since` (wall-clock unix
    /// seconds), by seq.
    async fn account_changes_since(&self, since: i64) -> Result<Vec<(i64, String)>, StoreError>;

    /// Up to `limit` account key blobs wrapped under KEK `kek_version`, after `after`
    /// (account id, algorithm, key version), in that order.
    async fn key_blobs_under(
        &self,
        kek_version: u32,
        after: Option<&KeyBlob>,
        limit: u32,
    ) -> Result<Vec<KeyBlob>, StoreError>;

    /// Replaces a blob if it is still under `from_kek` (a rewrap); returns whether it was.
    async fn replace_key_blob(&self, blob: &KeyBlob, wrapped: &[u8], kek_version: u32) -> Result<bool, StoreError>;

    /// How many account keys each KEK version wraps: (version, keys), ascending.
    async fn keys_per_kek(&self) -> Result<Vec<(u32, u64)>, StoreError>;

    /// How many issuer key blobs each KEK version wraps (only `next` and
    /// `active` keys keep one): (version, keys), ascending.
    async fn issuer_keys_per_kek(&self) -> Result<Vec<(u32, u64)>, StoreError>;

    /// Replaces the blob of issuer key `kid` if it is still under `from_kek`
    /// (a rewrap); returns whether it was.
    async fn replace_issuer_blob(
        &self,
        kid: &str,
        from_kek: u32,
        wrapped: &[u8],
        kek_version: u32,
    ) -> Result<bool, StoreError>;

    /// Appends one event on its own (operator commands run without a daemon).
    async fn append_event(&self, event: &crate::audit::NewEvent) -> Result<u64, StoreError> {
        let stored = self.audit().append_events(std::slice::from_ref(event)).await?;
        stored.first().map(|e| e.seq).ok_or_else(|| StoreError::Backend {
            backend: self.backend(),
            reason: "append returned no event".into(),
        })
    }

    /// Every issuer key row (revoked ones included), by algorithm, then
    /// creation time, then kid.
    async fn list_issuer_keys(&self) -> Result<Vec<IssuerKeyRecord>, StoreError>;

    /// Every issuer public key ever stored, with its lifecycle times (kept
    /// after the key's `issuer_keys` row is removed), by algorithm, then
    /// creation time, then kid.
    async fn issuer_key_history(&self) -> Result<Vec<IssuerKeyHistoryRecord>, StoreError>;

    /// Stores a new key whose state is `active` or `next`, only if its
    /// algorithm has no key in that state yet; returns whether it was stored
    /// (false: another writer was first, nothing written). Idempotent under
    /// races: at most one active and one next key per algorithm result.
    async fn add_issuer_key(&self, rec: &IssuerKeyRecord) -> Result<bool, StoreError> {
        Ok(self.add_issuer_key_audited(rec, None).await?.0)
    }

    /// As [`Store::add_issuer_key`]; when the key is stored, also appends
    /// `event` in the same transaction and returns its seq.
    async fn add_issuer_key_audited(
        &self,
        rec: &IssuerKeyRecord,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError>;

    /// In one transaction: the oldest `next` key of `alg` becomes active
    /// (`activated_at = now`) and the active key, if any, retired
    /// (`retired_at = now`), provided the next key was created at least
    /// `min_published` seconds before `now`. With `active_due_before`
    /// (scheduled rotation) the active key must have been activated at or
    /// before that time, and on PostgreSQL the rotation lock is only tried
    /// (`pg_try_advisory_xact_lock`): exactly one replica rotates.
    async fn promote_issuer_key(
        &self,
        alg: &str,
        now: i64,
        min_published: i64,
        active_due_before: Option<i64>,
    ) -> Result<PromoteOutcome, StoreError> {
        let (mut outcomes, _) = self
            .promote_issuer_keys_audited(&[alg], now, min_published, active_due_before, None)
            .await?;
        outcomes.pop().ok_or_else(|| StoreError::Backend {
            backend: self.backend(),
            reason: "promotion answered nothing".into(),
        })
    }

    /// As [`Store::promote_issuer_key`] for every algorithm of `algs`, in
    /// one transaction, all or nothing: when every one is promoted the
    /// answer holds one [`PromoteOutcome::Promoted`] per algorithm, in
    /// order, the events of `audit` are appended in the same transaction
    /// (see [`PromoteAudit`]) and the seq of the first is returned;
    /// otherwise the answer holds exactly one outcome, the first refusal,
    /// and nothing changed.
    async fn promote_issuer_keys_audited(
        &self,
        algs: &[&str],
        now: i64,
        min_published: i64,
        active_due_before: Option<i64>,
        audit: Option<&PromoteAudit>,
    ) -> Result<(Vec<PromoteOutcome>, Option<u64>), StoreError>;

    /// In one transaction: revokes the key (`revoked_at = now`); if it was
    /// active, the oldest `next` key of its algorithm becomes active at once.
    /// `None` if no key has this kid; a revoked key stays as it was.
    async fn revoke_issuer_key(&self, kid: &str, now: i64) -> Result<Option<RevokeOutcome>, StoreError> {
        Ok(self.revoke_issuer_key_audited(kid, now, None).await?.0)
    }

    /// As [`Store::revoke_issuer_key`]; when a key is revoked now (not
    /// already revoked), also appends `event` to the audit log in the same
    /// transaction and returns its seq.
    async fn revoke_issuer_key_audited(
        &self,
        kid: &str,
        now: i64,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(Option<RevokeOutcome>, Option<u64>), StoreError>;

    /// Retires a `next` or `active` key at once, with its audit event (a key
    /// whose token object is lost: `keyward kek restore`); it stays published
    /// and verifies what it signed, and signs nothing more. Returns whether a
    /// row changed.
    async fn retire_issuer_key_audited(
        &self,
        kid: &str,
        now: i64,
        event: &crate::audit::NewEvent,
    ) -> Result<bool, StoreError>;

    /// Deletes a retired or revoked key's row (after its grace period);
    /// returns whether a row was deleted.
    async fn delete_issuer_key(&self, kid: &str) -> Result<bool, StoreError> {
        Ok(self.delete_issuer_key_audited(kid, None).await?.0)
    }

    /// As [`Store::delete_issuer_key`]; when a row is deleted, also appends
    /// `event` in the same transaction and returns its seq.
    async fn delete_issuer_key_audited(
        &self,
        kid: &str,
        event: Option<&crate::audit::NewEvent>,
    ) -> Result<(bool, Option<u64>), StoreError>;

    /// Takes one token from the bucket `key` (created full), atomically;
    /// false, changing nothing, when it holds less than one token.
    async fn take_token(&self, key: &str, bucket: limits::Bucket, now: i64) -> Result<bool, StoreError>;

    /// Adds `amount` to the running total `key` unless the sum would pass
    /// `cap`, atomically: the new total, or None changing nothing.
    async fn add_to_total(&self, key: &str, amount: u128, cap: u128, now: i64) -> Result<Option<u128>, StoreError>;

    /// Takes back `amount` from the total `key` (a request that failed after
    /// its amount was added), never below zero.
    async fn subtract_from_total(&self, key: &str, amount: u128, now: i64) -> Result<(), StoreError>;

    /// Deletes limit counters that hold nothing any more, in one
    /// transaction: totals last changed before `totals_before`, and for each
    /// `(prefix, before)` the buckets whose key starts with `prefix`, last
    /// changed before `before`. Returns how many rows went.
    async fn prune_limit_counters(&self, totals_before: i64, buckets: &[(String, i64)]) -> Result<u64, StoreError>;
}

// ----- Receipts (issue 5) ----------------------------------------------------

/// An error from a receipt signer, passed through the store untouched.
pub type SignerError = Box<dyn std::error::Error + Send + Sync>;

/// What a receipt's signature covers besides the request: its id, issue
/// time and audit sequence number, as recorded (a retry that completes a
/// pending receipt signs the recorded ones, not its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptFacts {
    /// The receipt's id.
    pub receipt_id: String,
    /// Issue time, unix seconds UTC.
    pub created_at: i64,
    /// The seq of the receipt's audit event.
    pub audit_seq: u64,
}

/// Signs a receipt once its facts are recorded: returns the compact JWS.
/// Called with no transaction open and no store lock held.
pub type ReceiptSigner = Box<
    dyn FnOnce(ReceiptFacts) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, SignerError>> + Send>>
        + Send,
>;

/// A receipt to record (see [`Store::record_receipt`]).
#[derive(Debug, Clone)]
pub struct NewReceipt<'a> {
    /// The receipt's id (a UUID).
    pub receipt_id: &'a str,
    /// The seller account.
    pub account_id: &'a str,
    /// The client identity that asked for it: idempotency keys are scoped
    /// to it.
    pub caller: &'a str,
    /// Idempotency key, unique per (account, caller).
    pub request_id: &'a str,
    /// Hash of the request body, to tell a retry from a reuse of the id.
    pub body_hash: [u8; 32],
    /// The session the receipt was issued under, if any.
    pub session_id: Option<&'a str>,
    /// Issue time, unix seconds UTC.
    pub created_at: i64,
    /// The request's audit event, appended in the recording transaction;
    /// its sequence number becomes the receipt's `audit_seq`.
    pub audit: Option<crate::audit::NewEvent>,
    /// The event that compensates for `audit` if signing then fails (the
    /// receipt is withdrawn in its transaction).
    pub abandon: Option<crate::audit::NewEvent>,
}

/// A stored receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    /// Audit sequence number: the seq of the receipt's audit event (or,
    /// for a receipt recorded without one, the receipts table's own seq).
    pub seq: u64,
    /// The receipt's id.
    pub receipt_id: String,
    /// The seller account.
    pub account_id: String,
    /// The client identity that asked for it.
    pub caller: String,
    /// Idempotency key (the caller's).
    pub request_id: String,
    /// Hash of the request body.
    pub body_hash: [u8; 32],
    /// Session, if any.
    pub session_id: Option<String>,
    /// Issue time, unix seconds UTC.
    pub created_at: i64,
    /// The signed receipt (compact JWS).
    pub jws: String,
}

/// What [`Store::record_receipt`] did.
#[derive(Debug)]
pub enum ReceiptOutcome {
    /// Signed and stored.
    Recorded(ReceiptRecord),
    /// The same request was recorded before: its receipt.
    Replay(ReceiptRecord),
    /// The same request was recorded before but not yet signed (its first
    /// try failed or is still signing): signed now, with the recorded facts.
    Completed(ReceiptRecord),
    /// The request id was used before with another body; nothing changed.
    BodyMismatch,
    /// The signer failed: a receipt this call recorded is withdrawn, with
    /// its compensating event; one recorded before stays for a retry.
    SignFailed(SignerError),
}

/// A receipt row as read, before decoding.
pub(crate) struct RawReceipt {
    pub(crate) seq: i64,
    pub(crate) receipt_id: String,
    pub(crate) account_id: String,
    pub(crate) caller: String,
    pub(crate) request_id: String,
    pub(crate) body_hash: Vec<u8>,
    pub(crate) session_id: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) jws: String,
}

/// Columns of a receipt row, in [`RawReceipt`] order.
pub(crate) const RECEIPT_COLUMNS: &str =
    "COALESCE(audit_seq, seq) AS seq, receipt_id, account_id, caller, request_id, body_hash, session_id, created_at, jws";

impl RawReceipt {
    /// Decodes a row.
    pub(crate) fn decode(self) -> Result<ReceiptRecord, StoreError> {
        let what = format!("receipt {}", self.receipt_id);
        let seq = u64::try_from(self.seq).map_err(|_| StoreError::Corrupt {
            what: format!("{what}: negative seq"),
        })?;
        Ok(ReceiptRecord {
            seq,
            body_hash: decode_hash(&what, &self.body_hash)?,
            receipt_id: self.receipt_id,
            account_id: self.account_id,
            caller: self.caller,
            request_id: self.request_id,
            session_id: self.session_id,
            created_at: self.created_at,
            jws: self.jws,
        })
    }
}

/// Replay or mismatch for an existing receipt.
pub(crate) fn existing_receipt(r: &NewReceipt<'_>, existing: ReceiptRecord) -> ReceiptOutcome {
    if existing.body_hash == r.body_hash {
        ReceiptOutcome::Replay(existing)
    } else {
        ReceiptOutcome::BodyMismatch
    }
}

/// What the first phase of recording a receipt found or did.
pub(crate) enum Reserved {
    /// Nothing to sign: a replay or a mismatch.
    Done(ReceiptOutcome),
    /// Recorded now, unsigned.
    Fresh(ReceiptFacts),
    /// Recorded before, still unsigned.
    Pending(ReceiptRecord),
}

/// A retry meets an existing receipt: replay, mismatch, or one to complete.
pub(crate) fn reserved_existing(r: &NewReceipt<'_>, existing: ReceiptRecord) -> Reserved {
    if existing.body_hash == r.body_hash && existing.jws.is_empty() {
        Reserved::Pending(existing)
    } else {
        Reserved::Done(existing_receipt(r, existing))
    }
}
// ----- end receipts ------------------------------------------------------------

/// Opens the store named by `url` (`sqlite://PATH`, `postgres://...` or
/// `postgresql://...`) and runs its migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(PgStore::open(url).await?))
    } else {
        Err(StoreError::InvalidUrl {
            url: redact_url(url),
            reason: "expected sqlite://, postgres:// or postgresql://".into(),
        })
    }
}

/// `url` with the password (in the userinfo or a `password=` parameter)
/// replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    match head.split_once("://") {
        Some((scheme, rest)) => {
            let auth_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(auth_end);
            out.push_str(scheme);
            out.push_str("://");
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    match userinfo.split_once(':') {
                        Some((user, _password)) => {
                            out.push_str(user);
                            out.push_str(":***");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(host);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Removes any password that appears in `url` from `text`.
pub(crate) fn scrub(text: String, url: &str) -> String {
    let mut secrets = Vec::new();
    let head = url.split('?').next().unwrap_or(url);
    if let Some((_, rest)) = head.split_once("://") {
        let authority = rest.split('/').next().unwrap_or(rest);
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                secrets.push(password.to_string());
            }
        }
    }
    if let Some((_, query)) = url.split_once('?') {
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if k.eq_ignore_ascii_case("password") {
                    secrets.push(v.to_string());
                }
            }
        }
    }
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text, |t, s| t.replace(s.as_str(), "***"))
}

/// Maps a sqlx error to a [`StoreError`] for `backend`.
/// Begins a transaction on a connection of `pool` (with `statement`, such
/// as `BEGIN IMMEDIATE`, or the driver's plain `BEGIN`) in a task of its
/// own, and hands the open transaction over.
///
/// Why a task: sqlx's SQLite driver is not cancel-safe between the worker
/// thread's `BEGIN` and the `Transaction` value it returns. With a custom
/// statement it awaits a second round trip to the worker (to check that the
/// statement opened a transaction) after the `BEGIN` ran; a caller dropped in
/// that window (a request's deadline, a reset stream, a client gone) leaves
/// the connection inside the transaction — holding SQLite's write lock — with
/// no `Transaction` to roll it back, and the pool hands it out again: every
/// later writer then waits for a lock nobody will release, and that
/// connection answers "attempted to call begin_with at non-zero transaction
/// depth". Inside a spawned task the `Transaction` always comes to exist, and
/// once it exists dropping it, wherever that happens, queues its rollback.
/// The same helper serves PostgreSQL, so both backends open transactions the
/// same way.
///
/// The time from the call to the open transaction (waiting for a pooled
/// connection, then `BEGIN`; on SQLite `BEGIN IMMEDIATE` also waits for the
/// write lock) is observed in `stats`.
pub(crate) async fn begin<DB: sqlx::Database>(
    backend: &'static str,
    pool: &sqlx::Pool<DB>,
    stats: &TxStats,
    statement: Option<&'static str>,
) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
    let started = std::time::Instant::now();
    let pool = pool.clone();
    let task = tokio::spawn(async move {
        match statement {
            Some(s) => pool.begin_with(s).await,
            None => pool.begin().await,
        }
    });
    let result = match task.await {
        Ok(result) => result.map_err(|e| from_sqlx(backend, e)),
        Err(e) => Err(StoreError::Unavailable {
            backend,
            reason: format!("transaction start did not finish: {e}"),
        }),
    };
    stats.begin_wait.observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        stats.begin_failures.inc();
    }
    result
}

/// What a store measures of its transactions (see [`begin`]); the daemon
/// registers these series at start-up ([`Store::register_metrics`]).
#[derive(Debug, Clone)]
pub struct TxStats {
    /// Seconds from asking for a transaction to having it open.
    pub begin_wait: prometheus::Histogram,
    /// Transactions that could not be opened.
    pub begin_failures: prometheus::IntCounter,
}

impl TxStats {
    pub(crate) fn new(backend: &'static str) -> Result<TxStats, StoreError> {
        let err = |e: prometheus::Error| StoreError::Backend {
            backend,
            reason: format!("store metrics: {e}"),
        };
        Ok(TxStats {
            begin_wait: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "store_begin_wait_seconds",
                    "time from asking for a store transaction to having it open (pool wait, BEGIN, write lock)",
                )
                .buckets(vec![
                    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
                ]),
            )
            .map_err(err)?,
            begin_failures: prometheus::IntCounter::new(
                "store_begin_failures_total",
                "store transactions that could not be opened",
            )
            .map_err(err)?,
        })
    }
}

/// The connection pool's state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Connections open (idle or in use).
    pub size: u32,
    /// Connections idle in the pool.
    pub idle: usize,
}

pub(crate) fn from_sqlx(backend: &'static str, e: sqlx::Error) -> StoreError {
    use sqlx::Error as E;
    match e {
        E::Database(db) => from_database(backend, db.as_ref()),
        E::Migrate(m) => StoreError::Migration {
            backend,
            reason: m.to_string(),
        },
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => {
            StoreError::Unavailable {
                backend,
                reason: e.to_string(),
            }
        }
        E::RowNotFound
        | E::TypeNotFound { .. }
        | E::ColumnIndexOutOfBounds { .. }
        | E::ColumnNotFound(_)
        | E::ColumnDecode { .. }
        | E::Decode(_) => StoreError::Corrupt { what: e.to_string() },
        other => StoreError::Backend {
            backend,
            reason: other.to_string(),
        },
    }
}

fn from_database(backend: &'static str, db: &dyn sqlx::error::DatabaseError) -> StoreError {
    let reason = db.message().to_string();
    if db.is_unique_violation() {
        return StoreError::Conflict { what: reason };
    }
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let transient = match backend {
        "sqlite" => {
            // Extended result codes carry the primary code in the low byte.
            let primary = code.parse::<i64>().map(|c| c & 0xff).unwrap_or(-1);
            match primary {
                // CORRUPT, NOTADB
                11 | 26 => return StoreError::Corrupt { what: reason },
                // NOMEM, READONLY, BUSY, LOCKED, IOERR, FULL, CANTOPEN, PROTOCOL
                5..=8 | 10 | 13..=15 => true,
                _ => false,
            }
        }
        _ => {
            // Connection exception, insufficient resources, operator
            // intervention, system error; serialization failure, deadlock,
            // lock not available.
            ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
                || ["40001", "40P01", "55P03"].contains(&code.as_str())
        }
    };
    if transient {
        StoreError::Unavailable { backend, reason }
    } else {
        StoreError::Backend { backend, reason }
    }
}

/// Like [`from_sqlx`], naming `what` if the error is a unique violation.
pub(crate) fn conflict_as(
    backend: &'static str,
    what: impl FnOnce() -> String,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match from_sqlx(backend, e) {
        StoreError::Conflict { .. } => StoreError::Conflict { what: what() },
        other => other,
    }
}

/// One `account_keys` row as read, before it is checked.
pub(crate) struct RawKey {
    pub alg: String,
    pub public_key: Vec<u8>,
    pub wrapped: Vec<u8>,
    pub kek_version: i64,
    pub key_version: i64,
}

impl RawKey {
    /// Checks the row decodes.
    pub(crate) fn decode(self, account_id: &str) -> Result<KeyRecord, StoreError> {
        let alg: KeyAlg = self.alg.parse().map_err(|e| StoreError::Corrupt {
            what: format!("key of account {account_id}: {e}"),
        })?;
        let version = |name: &str, v: i64| {
            u32::try_from(v).map_err(|_| StoreError::Corrupt {
                what: format!("{alg} key of account {account_id}: {name} {v} out of range"),
            })
        };
        Ok(KeyRecord {
            alg,
            public_key: self.public_key,
            wrapped: self.wrapped,
            kek_version: version("kek_version", self.kek_version)?,
            key_version: version("key_version", self.key_version)?,
        })
    }
}

/// Puts keys and grants in the documented order, independent of the
/// database's collation.
pub(crate) fn normalize(rec: &mut AccountRecord) {
    rec.keys
        .sort_by(|a, b| (a.alg.as_str(), a.key_version).cmp(&(b.alg.as_str(), b.key_version)));
    rec.allowed.sort();
    rec.allowed.dedup();
}

/// The grants to write: sorted, without duplicates.
pub(crate) fn grants(rec: &AccountRecord) -> Vec<&str> {
    let mut allowed: Vec<&str> = rec.allowed.iter().map(String::as_str).collect();
    allowed.sort_unstable();
    allowed.dedup();
    allowed
}

/// Converts a `COUNT(*)` result.
pub(crate) fn count(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt {
        what: format!("negative account count {n}"),
    })
}

/// One `challenges` row as read, before it is checked.
pub(crate) struct RawChallenge {
    pub id: String,
    pub account_id: String,
    pub delegate: String,
    pub scopes: String,
    pub cap: String,
    pub nonce: Vec<u8>,
    pub typed_data: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub consumed_at: Option<i64>,
}

impl RawChallenge {
    /// Checks the row decodes.
    pub(crate) fn decode(self) -> Result<(ChallengeRecord, Option<i64>), StoreError> {
        let what = format!("challenge {}", self.id);
        let nonce = <[u8; 32]>::try_from(self.nonce.as_slice()).map_err(|_| StoreError::Corrupt {
            what: format!("{what}: nonce is {} bytes, not 32", self.nonce.len()),
        })?;
        let rec = ChallengeRecord {
            scopes: decode_scopes(&what, &self.scopes)?,
            cap: decode_amount(&what, "cap", &self.cap)?,
            nonce,
            id: self.id,
            account_id: self.account_id,
            delegate: self.delegate,
            typed_data: self.typed_data,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        };
        Ok((rec, self.consumed_at))
    }
}

/// One `sessions` row as read, before it is checked.
pub(crate) struct RawSession {
    pub id: String,
    pub account_id: String,
    pub delegate: String,
    pub scopes: String,
    pub cap: String,
    pub remaining: String,
    pub uses: i64,
    pub issued_at: i64,
    pub expires_at: i64,
    pub challenge_id: String,
    pub jti: String,
    pub revoked_at: Option<i64>,
    pub revoked_by: Option<String>,
    pub scope_grammar: i64,
}

impl RawSession {
    /// Checks the row decodes.
    pub(crate) fn decode(self) -> Result<SessionRecord, StoreError> {
        let what = format!("session {}", self.id);
        Ok(SessionRecord {
            scopes: decode_scopes(&what, &self.scopes)?,
            cap: decode_amount(&what, "cap", &self.cap)?,
            remaining: decode_amount(&what, "remaining", &self.remaining)?,
            uses: decode_uses(&what, self.uses)?,
            id: self.id,
            account_id: self.account_id,
            delegate: self.delegate,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            challenge_id: self.challenge_id,
            jti: self.jti,
            revoked_at: self.revoked_at,
            revoked_by: self.revoked_by,
            scope_grammar: u8::try_from(self.scope_grammar).map_err(|_| StoreError::Corrupt {
                what: format!("{what}: scope_grammar {} out of range", self.scope_grammar),
            })?,
        })
    }
}

/// The columns of a `sessions` row, in [`RawSession`] order.
pub(crate) const SESSION_COLUMNS: &str = "id, account_id, delegate, scopes, cap, remaining, uses, \
     issued_at, expires_at, challenge_id, jti, revoked_at, revoked_by, scope_grammar";

/// The columns of a `challenges` row, in [`RawChallenge`] order.
pub(crate) const CHALLENGE_COLUMNS: &str =
    "id, account_id, delegate, scopes, cap, nonce, typed_data, issued_at, expires_at, consumed_at";

/// A u128 amount as stored: decimal digits.
pub(crate) fn encode_amount(v: u128) -> String {
    v.to_string()
}

/// Parses a stored amount (plain decimal digits only).
pub(crate) fn decode_amount(what: &str, field: &str, s: &str) -> Result<u128, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: format!("{what}: {field} {s:?} is not a u128"),
    };
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(corrupt());
    }
    s.parse::<u128>().map_err(|_| corrupt())
}

/// Scopes as stored: a JSON array of strings.
pub(crate) fn encode_scopes(backend: &'static str, scopes: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(scopes).map_err(|e| StoreError::Backend {
        backend,
        reason: format!("cannot encode scopes: {e}"),
    })
}

fn decode_scopes(what: &str, s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        what: format!("{what}: scopes {s:?}: {e}"),
    })
}

/// A stored use count (never negative).
pub(crate) fn decode_uses(what: &str, uses: i64) -> Result<u64, StoreError> {
    u64::try_from(uses).map_err(|_| StoreError::Corrupt {
        what: format!("{what}: uses {uses} is negative"),
    })
}

/// A use count to store.
pub(crate) fn encode_uses(what: &str, uses: u64) -> Result<i64, StoreError> {
    i64::try_from(uses).map_err(|_| StoreError::Corrupt {
        what: format!("{what}: uses {uses} out of range"),
    })
}

/// A spend's body hash as stored (exactly 32 bytes).
pub(crate) fn decode_hash(what: &str, bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| StoreError::Corrupt {
        what: format!("{what}: body hash is {} bytes, not 32", bytes.len()),
    })
}

/// The error for an `open_session` whose record names another challenge.
pub(crate) fn challenge_mismatch(backend: &'static str, challenge_id: &str, session: &SessionRecord) -> StoreError {
    StoreError::Backend {
        backend,
        reason: format!(
            "session {} names challenge {}, not {challenge_id}",
            session.id, session.challenge_id
        ),
    }
}

/// What `reserve_spend` decides from the locked session row and any
/// existing spend row.
pub(crate) enum SpendDecision {
    /// Answer this without changing anything.
    Answer(SpendOutcome),
    /// Write the session's new remaining and uses (and each asset's new
    /// spent total), and insert the spend.
    Reserve {
        /// The session row's `remaining` afterwards.
        session_remaining: u128,
        /// What is left of the cap the spend's main part counts against, to report.
        left: u128,
        /// The session's `uses` afterwards: the spend's nonce.
        uses: u64,
        /// Each asset with its own cap the spend counts against, and its spent total afterwards.
        asset_spent: Vec<(String, u128)>,
    },
}

/// An existing `spends` row for the same request id, as read.
pub(crate) struct RawSpend {
    pub body_hash: Vec<u8>,
    pub response: Option<Vec<u8>>,
}

/// The parts of a spend request: its main part, then its fee if any.
pub(crate) fn spend_parts<'a>(r: &SpendRequest<'a>) -> impl Iterator<Item = SpendPart<'a>> {
    std::iter::once(SpendPart {
        amount: r.amount,
        asset_cap: r.asset_cap,
    })
    .chain(r.fee)
}

/// The checks of `reserve_spend`, in the documented order, on the session
/// row locked for update (or read under the writer lock). `spent` holds the
/// spent total of each asset with its own cap the request counts against
/// (absent: 0), read under the same lock. All parts are reserved or none.
pub(crate) fn decide_spend(
    r: &SpendRequest<'_>,
    session: Option<SessionRecord>,
    existing: Option<RawSpend>,
    spent: &[(String, u128)],
) -> Result<SpendDecision, StoreError> {
    let Some(session) = session else {
        return Ok(SpendDecision::Answer(SpendOutcome::NotFound));
    };
    if let Some(spend) = existing {
        let what = format!("spend {} of session {}", r.request_id, r.session_id);
        let stored = decode_hash(&what, &spend.body_hash)?;
        let outcome = if stored != r.body_hash {
            SpendOutcome::BodyMismatch
        } else {
            match spend.response {
                Some(response) => SpendOutcome::Replay { response },
                None => SpendOutcome::InProgress,
            }
        };
        return Ok(SpendDecision::Answer(outcome));
    }
    if session.revoked_at.is_some() {
        return Ok(SpendDecision::Answer(SpendOutcome::Revoked));
    }
    if r.now >= session.expires_at {
        return Ok(SpendDecision::Answer(SpendOutcome::Expired));
    }
    // What each cap must give: parts counting against the same cap add up.
    let mut needs: Vec<(Option<(&str, u128)>, u128)> = Vec::with_capacity(2);
    for part in spend_parts(r) {
        let key = part.asset_cap.map(|(a, _)| a);
        match needs.iter_mut().find(|(c, _)| c.map(|(a, _)| a) == key) {
            Some((_, need)) => *need = need.saturating_add(part.amount),
            None => needs.push((part.asset_cap, part.amount)),
        }
    }
    let spent_of = |asset: &str| spent.iter().find(|(a, _)| a == asset).map_or(0, |(_, v)| *v);
    let mut session_remaining = session.remaining;
    let mut asset_spent = Vec::new();
    let mut left = None;
    for (cap, need) in needs {
        let available = match cap {
            Some((asset, cap)) => cap.saturating_sub(spent_of(asset)),
            None => session.remaining,
        };
        if need > available {
            return Ok(SpendDecision::Answer(SpendOutcome::Insufficient {
                remaining: available,
                asset: cap.map(|(a, _)| a.to_string()),
                requested: need,
            }));
        }
        match cap {
            Some((asset, _)) => asset_spent.push((asset.to_string(), spent_of(asset) + need)),
            None => session_remaining = available - need,
        }
        left.get_or_insert(available - need);
    }
    let uses = session.uses.checked_add(1).ok_or_else(|| StoreError::Corrupt {
        what: format!("session {}: uses overflow", session.id),
    })?;
    Ok(SpendDecision::Reserve {
        session_remaining,
        left: left.unwrap_or(session_remaining),
        uses,
        asset_spent,
    })
}

// ---- Issuer keys (JWKS lifecycle, issue 5) -------------------------------

/// Lifecycle state of an issuer key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IssuerKeyState {
    /// Published, not yet signing.
    Next,
    /// The one key of its algorithm that signs.
    Active,
    /// Published for verification of old signatures only.
    Retired,
    /// Compromised or withdrawn: not published, never verifies.
    Revoked,
}

impl IssuerKeyState {
    /// `next`, `active`, `retired` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            IssuerKeyState::Next => "next",
            IssuerKeyState::Active => "active",
            IssuerKeyState::Retired => "retired",
            IssuerKeyState::Revoked => "revoked",
        }
    }

    /// Parses a stored state.
    pub fn parse(s: &str) -> Option<IssuerKeyState> {
        [
            IssuerKeyState::Next,
            IssuerKeyState::Active,
            IssuerKeyState::Retired,
            IssuerKeyState::Revoked,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Whether keys in this state are in the JWKS.
    pub fn published(self) -> bool {
        !matches!(self, IssuerKeyState::Revoked)
    }
}

/// One issuer key as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuerKeyRecord {
    /// The RFC 7638 thumbprint.
    pub kid: String,
    /// JOSE algorithm name (`EdDSA`, `ES256`, `ES256K`).
    pub alg: String,
    /// The HSM object label.
    pub label: String,
    /// Lifecycle state.
    pub state: IssuerKeyState,
    /// When the key was created (and published as `next`), unix seconds.
    pub created_at: i64,
    /// When it became active.
    pub activated_at: Option<i64>,
    /// When it was retired.
    pub retired_at: Option<i64>,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
    /// The public JWK, JSON.
    pub jwk: String,
    /// The private key wrapped under KEK `kek_version` (`CKM_AES_KEY_WRAP_PAD` of its PKCS#8),
    /// as account keys are. `None` for a key that lives only as a token object (made before
    /// issuer keys were stored), and for one that can no longer sign (retired or revoked: its
    /// blob is destroyed in the transaction that changes its state).
    pub wrapped: Option<Vec<u8>>,
    /// The KEK version of `wrapped`; kept after the blob is destroyed, so it also tells a
    /// stored key from a token-only one.
    pub kek_version: Option<u32>,
}

impl fmt::Debug for IssuerKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKeyRecord")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("label", &self.label)
            .field("state", &self.state)
            .field("created_at", &self.created_at)
            .field("activated_at", &self.activated_at)
            .field("retired_at", &self.retired_at)
            .field("revoked_at", &self.revoked_at)
            .field(
                "wrapped",
                &self.wrapped.as_ref().map(|w| format!("<{} bytes>", w.len())),
            )
            .field("kek_version", &self.kek_version)
            .finish()
    }
}

/// One `issuer_key_history` row: an issuer public key and its lifecycle
/// times, kept for as long as anything it signed may need verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerKeyHistoryRecord {
    /// The RFC 7638 thumbprint.
    pub kid: String,
    /// JOSE algorithm name.
    pub alg: String,
    /// The public JWK, JSON.
    pub jwk: String,
    /// When the key was created, unix seconds.
    pub created_at: i64,
    /// When it became active, if it did.
    pub activated_at: Option<i64>,
    /// When it was retired, if it was.
    pub retired_at: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// One account key's blob, as `keyward kek rewrap` moves it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyBlob {
    /// The account.
    pub account_id: String,
    /// `secp256k1` or `ed25519`.
    pub alg: String,
    /// The account key's version.
    pub key_version: u32,
    /// The KEK version it is under.
    pub kek_version: u32,
    /// The wrapped private key.
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for KeyBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyBlob")
            .field("account_id", &self.account_id)
            .field("alg", &self.alg)
            .field("key_version", &self.key_version)
            .field("kek_version", &self.kek_version)
            .finish_non_exhaustive()
    }
}

/// One KEK backup (`keyward kek backup`).
#[derive(Clone, PartialEq, Eq)]
pub struct KekBackupRecord {
    /// 16 hex digits; also in every share.
    pub id: String,
    /// When it was made, unix seconds.
    pub created_at: i64,
    /// Who made it (the operator's login name).
    pub created_by: String,
    /// Shares needed (M).
    pub threshold: u8,
    /// Shares made (N).
    pub shares: u8,
    /// SHA-256("keyward recovery check" ‖ id ‖ recovery key).
    pub recovery_check: [u8; 32],
    /// The wrapped KEKs.
    pub keks: Vec<crate::hsm::BackedUpKek>,
}

impl fmt::Debug for KekBackupRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KekBackupRecord")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .field("threshold", &self.threshold)
            .field("shares", &self.shares)
            .field("keks", &self.keks.iter().map(|k| k.version).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What [`Store::promote_issuer_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromoteOutcome {
    /// The oldest `next` key became active; the previous active key (if any) retired.
    Promoted {
        /// The new active key.
        kid: String,
        /// The key retired.
        retired: Option<String>,
    },
    /// No `next` key of this algorithm.
    NoNext,
    /// The `next` key has not been published long enough.
    TooEarly {
        /// The next key.
        kid: String,
        /// When it may be promoted, unix seconds.
        ready_at: i64,
    },
    /// Scheduled promotion: the active key is not due (another replica rotated first).
    NotDue,
    /// Scheduled promotion: another replica holds the rotation lock.
    Busy,
}

/// The audit events a promotion appends in its transaction (see
/// [`Store::promote_issuer_keys_audited`]).
#[derive(Debug, Clone)]
pub struct PromoteAudit {
    /// Appended once for the whole promotion; its `signature_ref` becomes
    /// `kid:` followed by the kids made active, comma-separated.
    pub promoted: crate::audit::NewEvent,
    /// If set, appended after it once per key retired, `signature_ref`
    /// `kid:<retired kid>` (scheduled rotations record the retirement as a
    /// change of its own).
    pub retired: Option<crate::audit::NewEvent>,
}

impl PromoteAudit {
    /// The events to append for the promotions `(promoted kid, retired kid)`.
    pub(crate) fn events(&self, promoted: &[(String, Option<String>)]) -> Vec<crate::audit::NewEvent> {
        let mut first = self.promoted.clone();
        let kids: Vec<&str> = promoted.iter().map(|(kid, _)| kid.as_str()).collect();
        first.signature_ref = format!("kid:{}", kids.join(","));
        let mut out = vec![first];
        if let Some(template) = &self.retired {
            for retired in promoted.iter().filter_map(|(_, r)| r.as_ref()) {
                let mut e = template.clone();
                e.signature_ref = format!("kid:{retired}");
                out.push(e);
            }
        }
        out
    }
}

/// What [`Store::revoke_issuer_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The key as it was before (state `revoked` if it already was).
    pub before: IssuerKeyRecord,
    /// The `next` key promoted because the revoked key was active.
    pub promoted: Option<String>,
}

/// One `issuer_keys` row as read.
pub(crate) struct RawIssuerKey {
    pub kid: String,
    pub alg: String,
    pub label: String,
    pub state: String,
    pub created_at: i64,
    pub activated_at: Option<i64>,
    pub retired_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub jwk: String,
    pub wrapped: Option<Vec<u8>>,
    pub kek_version: Option<i64>,
}

impl RawIssuerKey {
    pub(crate) fn decode(self) -> Result<IssuerKeyRecord, StoreError> {
        let state = IssuerKeyState::parse(&self.state).ok_or_else(|| StoreError::Corrupt {
            what: format!("issuer key {}: state {:?}", self.kid, self.state),
        })?;
        let kek_version = self
            .kek_version
            .map(|v| {
                u32::try_from(v).map_err(|_| StoreError::Corrupt {
                    what: format!("issuer key {}: kek_version {v}", self.kid),
                })
            })
            .transpose()?;
        Ok(IssuerKeyRecord {
            kid: self.kid,
            alg: self.alg,
            label: self.label,
            state,
            created_at: self.created_at,
            activated_at: self.activated_at,
            retired_at: self.retired_at,
            revoked_at: self.revoked_at,
            jwk: self.jwk,
            wrapped: self.wrapped,
            kek_version,
        })
    }
}

/// The columns of an `issuer_keys` row.
pub(crate) const ISSUER_KEY_COLUMNS: &str =
    "kid, alg, label, state, created_at, activated_at, retired_at, revoked_at, jwk, wrapped, kek_version";

/// Orders keys by algorithm, then creation time, then kid.
pub(crate) fn sort_issuer_keys(keys: &mut [IssuerKeyRecord]) {
    keys.sort_by(|a, b| (&a.alg, a.created_at, &a.kid).cmp(&(&b.alg, b.created_at, &b.kid)));
}

/// The answer of a promotion that succeeded, from its `(promoted, retired)` kids.
pub(crate) fn promoted_outcomes(promoted: Vec<(String, Option<String>)>) -> Vec<PromoteOutcome> {
    promoted
        .into_iter()
        .map(|(kid, retired)| PromoteOutcome::Promoted { kid, retired })
        .collect()
}

/// What promotion decides from the rows of one algorithm (read under the lock).
pub(crate) fn decide_promote(
    keys: &[IssuerKeyRecord],
    now: i64,
    min_published: i64,
    active_due_before: Option<i64>,
) -> Result<(String, Option<String>), PromoteOutcome> {
    let active = keys.iter().find(|k| k.state == IssuerKeyState::Active);
    if let (Some(due), Some(a)) = (active_due_before, active) {
        if a.activated_at.unwrap_or(a.created_at) > due {
            return Err(PromoteOutcome::NotDue);
        }
    }
    let next = keys
        .iter()
        .filter(|k| k.state == IssuerKeyState::Next)
        .min_by(|a, b| (a.created_at, &a.kid).cmp(&(b.created_at, &b.kid)));
    let Some(next) = next else {
        return Err(PromoteOutcome::NoNext);
    };
    let ready_at = next.created_at.saturating_add(min_published);
    if ready_at > now {
        return Err(PromoteOutcome::TooEarly {
            kid: next.kid.clone(),
            ready_at,
        });
    }
    Ok((next.kid.clone(), active.map(|a| a.kid.clone())))
}
