//! A room's clock: `rooms.last_ts` is the time of the room's last message, so the actor that
//! hosts the room next (after a restart, a failover or a fallback) stamps no message earlier.
//! With a room's times non-decreasing in seq and each message id (a UUIDv7) carrying its time,
//! the store finds a message by id through the primary key (room_id, seq), and the index of ids
//! that m20261204_000006 added goes: it cost a quarter of SQLite's commit throughput
//! (docs/benchmarks.md, "the stanza-id index").
//!
//! Messages stored before this migration have ids minted apart from their times (the id a
//! moment earlier, usually the same millisecond): they are still found when the two agree.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Rooms {
    Table,
    Id,
    LastTs,
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    RoomId,
    Id,
    CreatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Rooms::Table)
                    .add_column_if_not_exists(ColumnDef::new(Rooms::LastTs).big_integer().not_null().default(0))
                    .to_owned(),
            )
            .await?;
        // Every room's clock starts at its newest message.
        let newest = Query::select()
            .expr(Func::coalesce([Expr::col((Messages::Table, Messages::CreatedAt)).max(), Expr::val(0i64)]))
            .from(Messages::Table)
            .and_where(Expr::col((Messages::Table, Messages::RoomId)).equals((Rooms::Table, Rooms::Id)))
            .to_owned();
        manager
            .exec_stmt(Query::update().table(Rooms::Table).value(Rooms::LastTs, newest).to_owned())
            .await?;
        manager
            .drop_index(Index::drop().name("ix_messages_room_id_id").table(Messages::Table).to_owned())
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("ix_messages_room_id_id")
                    .table(Messages::Table)
                    .col(Messages::RoomId)
                    .col(Messages::Id)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager.alter_table(Table::alter().table(Rooms::Table).drop_column(Rooms::LastTs).to_owned()).await
    }
}
