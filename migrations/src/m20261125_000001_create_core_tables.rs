//! Messages record the room epoch they were committed under, so a history checker can prove
//! that no row was written by a fenced host.
//!
//! Core tables: rooms (with `public` copied out of the config JSON so `list` can filter in SQL), messages, affiliations, users, sessions, node_leases, node_states.
//!
//! Timestamps that the application assigns (message and room creation) are BIGINT milliseconds
//! since the Unix epoch: identical on every backend and cheap to compare. Lease times are kept in
//! the database's own clock (`alive_until`), so they use the native timestamp type.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Rooms {
    Table,
    Id,
    Address,
    Config,
    Public,
    HomeNode,
    HostNode,
    Epoch,
    LastSeq,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    RoomId,
    Seq,
    Id,
    Sender,
    Nick,
    Body,
    ClientMsgId,
    Epoch,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Affiliations {
    Table,
    RoomId,
    UserName,
    Affiliation,
}

#[derive(DeriveIden)]
enum Users {
    Table,
    Name,
    PasswordHash,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Sessions {
    Table,
    TokenHash,
    UserName,
    Guest,
    CreatedAt,
    ExpiresAt,
}

#[derive(DeriveIden)]
enum NodeLeases {
    Table,
    NodeId,
    Holder,
    AliveUntil,
    Incarnation,
}

#[derive(DeriveIden)]
enum NodeStates {
    Table,
    Id,
    NodeId,
    State,
    Reason,
    Epoch,
    At,
}

/// A time on the database clock with microseconds: MySQL's plain TIMESTAMP keeps whole
/// seconds only, far too coarse for a lease measured in hundreds of milliseconds.
fn db_clock_time<T: IntoIden>(manager: &SchemaManager, col: T) -> ColumnDef {
    if manager.get_database_backend() == sea_orm_migration::sea_orm::DbBackend::MySql {
        ColumnDef::new(col).custom(Alias::new("DATETIME(6)")).not_null().to_owned()
    } else {
        timestamp_with_time_zone(col)
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Rooms::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Rooms::Id))
                    .col(string_len(Rooms::Address, 255).unique_key())
                    .col(text(Rooms::Config))
                    .col(boolean(Rooms::Public))
                    .col(string_len(Rooms::HomeNode, 64))
                    .col(string_len(Rooms::HostNode, 64))
                    .col(big_integer(Rooms::Epoch))
                    .col(big_integer(Rooms::LastSeq))
                    .col(big_integer(Rooms::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_rooms_host_node")
                    .table(Rooms::Table)
                    .col(Rooms::HostNode)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Messages::Table)
                    .if_not_exists()
                    .col(big_integer(Messages::RoomId))
                    .col(big_integer(Messages::Seq))
                    .col(string_len(Messages::Id, 36))
                    .col(string_len(Messages::Sender, 64))
                    .col(string_len(Messages::Nick, 64))
                    .col(text(Messages::Body))
                    .col(string_len(Messages::ClientMsgId, 128))
                    .col(big_integer(Messages::Epoch))
                    .col(big_integer(Messages::CreatedAt))
                    .primary_key(Index::create().col(Messages::RoomId).col(Messages::Seq))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_messages_room_sender_cid")
                    .table(Messages::Table)
                    .col(Messages::RoomId)
                    .col(Messages::Sender)
                    .col(Messages::ClientMsgId)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Affiliations::Table)
                    .if_not_exists()
                    .col(big_integer(Affiliations::RoomId))
                    .col(string_len(Affiliations::UserName, 64))
                    .col(string_len(Affiliations::Affiliation, 16))
                    .primary_key(
                        Index::create()
                            .col(Affiliations::RoomId)
                            .col(Affiliations::UserName),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_affiliations_user")
                    .table(Affiliations::Table)
                    .col(Affiliations::UserName)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Users::Table)
                    .if_not_exists()
                    .col(string_len(Users::Name, 64).primary_key())
                    .col(string_len(Users::PasswordHash, 255))
                    .col(big_integer(Users::CreatedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Sessions::Table)
                    .if_not_exists()
                    .col(string_len(Sessions::TokenHash, 64).primary_key())
                    .col(string_len(Sessions::UserName, 64))
                    .col(boolean(Sessions::Guest))
                    .col(big_integer(Sessions::CreatedAt))
                    .col(big_integer(Sessions::ExpiresAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(NodeLeases::Table)
                    .if_not_exists()
                    .col(string_len(NodeLeases::NodeId, 64).primary_key())
                    .col(string_len(NodeLeases::Holder, 64))
                    .col(db_clock_time(manager, NodeLeases::AliveUntil))
                    .col(big_integer(NodeLeases::Incarnation))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(NodeStates::Table)
                    .if_not_exists()
                    .col(big_pk_auto(NodeStates::Id))
                    .col(string_len(NodeStates::NodeId, 64))
                    .col(string_len(NodeStates::State, 64))
                    .col(string_len(NodeStates::Reason, 64))
                    .col(big_integer(NodeStates::Epoch))
                    .col(db_clock_time(manager, NodeStates::At))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            NodeStates::Table.into_iden(),
            NodeLeases::Table.into_iden(),
            Sessions::Table.into_iden(),
            Users::Table.into_iden(),
            Affiliations::Table.into_iden(),
            Messages::Table.into_iden(),
            Rooms::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
