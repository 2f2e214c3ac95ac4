//! tower-sessions compatibility: [`HoldfastStore`] is a `tower_sessions::SessionStore` over
//! Holdfast's durable store, so an axum application can put `SessionManagerLayer::new(
//! HoldfastStore::new(store))` in front of its routes and get sessions that survive any
//! instance's death, on SQLite or Postgres, without adopting the rest of Holdfast.
//!
//! Records live in the store's `session_blobs` table (migration 0003): the data map as JSON
//! and the expiry, keyed — like Holdfast's own sessions — by the SHA-256 of the session id, so
//! a leaked database holds no live session ids. (The `sessions` table does not fit: its rows
//! belong to a user and hold no data map.) `create` picks a new id on a collision, as the
//! trait asks; `ExpiredDeletion::delete_expired` removes expired rows (run
//! `continuously_delete_expired` on a task); loads never return an expired record.

use async_trait::async_trait;
use holdfast_store::Store;
use sha2::{Digest, Sha256};
use std::fmt;
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, ExpiredDeletion, SessionStore};

/// tower-sessions' store trait over Holdfast's durable store. Cheap to clone.
#[derive(Clone)]
pub struct HoldfastStore {
    store: Store,
}

impl HoldfastStore {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl fmt::Debug for HoldfastStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldfastStore")
            .field("backend", &self.store.backend())
            .finish()
    }
}

fn id_hash(id: &Id) -> String {
    hex::encode(Sha256::digest(id.to_string().as_bytes()))
}

fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn backend(e: holdfast_store::Error) -> session_store::Error {
    session_store::Error::Backend(e.to_string())
}

fn encode(record: &Record) -> session_store::Result<Vec<u8>> {
    serde_json::to_vec(&record.data).map_err(|e| session_store::Error::Encode(e.to_string()))
}

#[async_trait]
impl SessionStore for HoldfastStore {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let data = encode(record)?;
        let expires = to_ms(record.expiry_date);
        while !self
            .store
            .session_blob_insert(&id_hash(&record.id), &data, expires)
            .await
            .map_err(backend)?
        {
            record.id = Id::default();
        }
        Ok(())
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.store
            .session_blob_put(
                &id_hash(&record.id),
                &encode(record)?,
                to_ms(record.expiry_date),
            )
            .await
            .map_err(backend)
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let now = to_ms(OffsetDateTime::now_utc());
        let Some((data, expires)) = self
            .store
            .session_blob_get(&id_hash(id), now)
            .await
            .map_err(backend)?
        else {
            return Ok(None);
        };
        let data = serde_json::from_slice(&data)
            .map_err(|e| session_store::Error::Decode(e.to_string()))?;
        let expiry_date =
            OffsetDateTime::from_unix_timestamp_nanos(i128::from(expires) * 1_000_000)
                .map_err(|e| session_store::Error::Decode(e.to_string()))?;
        Ok(Some(Record {
            id: *id,
            data,
            expiry_date,
        }))
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.store
            .session_blob_delete(&id_hash(id))
            .await
            .map_err(backend)
    }
}

#[async_trait]
impl ExpiredDeletion for HoldfastStore {
    async fn delete_expired(&self) -> session_store::Result<()> {
        let now = to_ms(OffsetDateTime::now_utc());
        self.store.session_blob_reap(now).await.map_err(backend)?;
        Ok(())
    }
}
