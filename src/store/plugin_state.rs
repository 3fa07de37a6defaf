//! `plugin_state`: each plugin's key-value state per room, stored with the room.
//!
//! Writes are fenced like every room mutation (`Store::check_fence` in the same
//! transaction), so a node that lost the room cannot write its plugins' state, and the state
//! moves with the room when another node takes it over.

use super::{Fence, RoomId, Store, StoreError};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
use std::collections::HashMap;

/// The `plugin_state` table; primary key (room_id, plugin, key).
pub mod entity {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "plugin_state")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub room_id: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub plugin: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub value: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

impl Store {
    /// Every key of `plugin` in room `room`.
    pub async fn plugin_state_load(&self, room: RoomId, plugin: &str) -> Result<HashMap<String, String>, StoreError> {
        Ok(entity::Entity::find()
            .filter(entity::Column::RoomId.eq(room.0))
            .filter(entity::Column::Plugin.eq(plugin))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| (m.key, m.value))
            .collect())
    }

    /// Apply one call's changes (`None` = delete) in one fenced transaction.
    pub async fn plugin_state_apply(&self, fence: &Fence, plugin: &str, changes: &HashMap<String, Option<String>>) -> Result<(), StoreError> {
        let txn = self.begin_write().await?;
        let result = async {
            self.check_fence(&txn, fence).await?;
            let keys: Vec<&str> = changes.keys().map(String::as_str).collect();
            entity::Entity::delete_many()
                .filter(entity::Column::RoomId.eq(fence.room.0))
                .filter(entity::Column::Plugin.eq(plugin))
                .filter(entity::Column::Key.is_in(keys))
                .exec(&txn)
                .await?;
            let rows: Vec<entity::ActiveModel> = changes
                .iter()
                .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
                .map(|(k, v)| entity::ActiveModel {
                    room_id: Set(fence.room.0),
                    plugin: Set(plugin.to_owned()),
                    key: Set(k.clone()),
                    value: Set(v.clone()),
                })
                .collect();
            if !rows.is_empty() {
                entity::Entity::insert_many(rows).exec(&txn).await.map_err(StoreError::classify)?;
            }
            Ok::<(), StoreError>(())
        }
        .await;
        super::settle(txn, result).await
    }

    /// Delete every plugin's state of a room (the room is being destroyed), inside `txn`.
    pub(super) async fn plugin_state_delete_room<C: sea_orm::ConnectionTrait>(&self, txn: &C, room: RoomId) -> Result<(), StoreError> {
        entity::Entity::delete_many().filter(entity::Column::RoomId.eq(room.0)).exec(txn).await?;
        Ok(())
    }
}
