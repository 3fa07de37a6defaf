//! Plugin state: each plugin's key-value pairs per room, stored with the room so they survive
//! restarts and move with the room on failover. Written only under the room's fence.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PluginState {
    Table,
    RoomId,
    Plugin,
    Key,
    Value,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PluginState::Table)
                    .if_not_exists()
                    .col(big_integer(PluginState::RoomId))
                    .col(string_len(PluginState::Plugin, 64))
                    // 255 bytes: the WIT host's key limit; fits MySQL's index key length.
                    .col(string_len(PluginState::Key, 255))
                    .col(text(PluginState::Value))
                    .primary_key(Index::create().col(PluginState::RoomId).col(PluginState::Plugin).col(PluginState::Key))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(PluginState::Table).if_exists().to_owned()).await
    }
}
