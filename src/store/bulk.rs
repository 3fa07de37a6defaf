//! Bulk room creation for benchmarks and imports: many rooms and their owner affiliations in
//! multi-row INSERTs, one transaction per call.
//!
//! [`Store::create_room`] costs one transaction (one durable commit) per room, which is right
//! for a client's `create` and hopeless for filling a store with a million rooms. Here every
//! chunk of rooms is one multi-row INSERT, and their owners are added by one
//! `INSERT … SELECT id … WHERE address IN (…)`, which works the same on every backend (MySQL has
//! no `RETURNING`) and never guesses ids.

use super::entity::{affiliation, room};
use super::{NodeId, Store, StoreError, now_ms};
use crate::ids::RoomAddr;
use crate::protocol::{Affiliation, RoomConfig};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, TransactionTrait};

/// Rooms per INSERT: 8 bind parameters each keeps a statement far below every backend's limit
/// (SQLite 32,766, PostgreSQL and MySQL 65,535) while amortising the round trip.
const BULK_CHUNK_ROWS: usize = 1000;

impl Store {
    /// Create every room of `addresses`, hosted (and homed) on `home` at epoch 1, each with
    /// `config` and with `owner` as its owner, in one transaction. Returns how many rooms were
    /// created. [`StoreError::Conflict`] (and nothing written) if any address is taken.
    pub async fn bulk_create_rooms(
        &self,
        addresses: &[RoomAddr],
        config: &RoomConfig,
        owner: &str,
        home: &NodeId,
    ) -> Result<u64, StoreError> {
        let now = now_ms();
        let config_json = serde_json::to_string(config).expect("room config serializes");
        let txn = self.db.begin().await?;
        for chunk in addresses.chunks(BULK_CHUNK_ROWS) {
            let mut rooms = Query::insert()
                .into_table(room::Entity)
                .columns([
                    room::Column::Address,
                    room::Column::Config,
                    room::Column::Public,
                    room::Column::HomeNode,
                    room::Column::HostNode,
                    room::Column::Epoch,
                    room::Column::LastSeq,
                    room::Column::CreatedAt,
                ])
                .to_owned();
            for address in chunk {
                rooms.values_panic([
                    address.0.clone().into(),
                    config_json.clone().into(),
                    config.public.into(),
                    home.0.clone().into(),
                    home.0.clone().into(),
                    1i64.into(),
                    0i64.into(),
                    now.into(),
                ]);
            }
            txn.execute(&rooms).await.map_err(StoreError::classify)?;

            let ids = Query::select()
                .column(room::Column::Id)
                .expr(Expr::val(owner))
                .expr(Expr::val(Affiliation::Owner.as_str()))
                .from(room::Entity)
                .and_where(room::Column::Address.is_in(chunk.iter().map(|a| a.0.clone())))
                .to_owned();
            let owners = Query::insert()
                .into_table(affiliation::Entity)
                .columns([affiliation::Column::RoomId, affiliation::Column::UserName, affiliation::Column::Affiliation])
                .select_from(ids)
                .map_err(|e| StoreError::Corrupt(format!("building the owners INSERT: {e}")))?
                .to_owned();
            txn.execute(&owners).await.map_err(StoreError::classify)?;
        }
        txn.commit().await?;
        Ok(addresses.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rooms created in bulk are ordinary rooms: loadable, hosted at epoch 1, owned by `owner`,
    /// and a taken address fails the whole call.
    #[tokio::test]
    async fn bulk_rooms_load_like_created_rooms() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/bulk.db", dir.path().display());
        let store = Store::connect(&url, 2, "normal").await.unwrap();
        store.migrate().await.unwrap();
        let home = NodeId("n1".into());
        let addrs: Vec<RoomAddr> = (0..2500).map(|i| RoomAddr(format!("r{i}@conference.localhost"))).collect();
        let n = store.bulk_create_rooms(&addrs, &RoomConfig::default(), "alice", &home).await.unwrap();
        assert_eq!(n, 2500);
        assert_eq!(store.count_rooms().await.unwrap(), 2500);
        let row = store.load_room(&addrs[1234]).await.unwrap().unwrap();
        assert_eq!((row.host_node.clone(), row.epoch.0, row.last_seq), (home.clone(), 1, 0));
        let affs = store.load_affiliations(row.id).await.unwrap();
        assert_eq!(affs.get("alice"), Some(&Affiliation::Owner));
        assert_eq!(affs.len(), 1);
        let again = store.bulk_create_rooms(&addrs[2499..], &RoomConfig::default(), "bob", &home).await;
        assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
        assert_eq!(store.count_rooms().await.unwrap(), 2500);
    }
}
