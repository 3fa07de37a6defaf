//! Redundancy pairs: an index for the one-statement fallback (`WHERE home_node = …`; takeover's
//! `WHERE host_node = …` has its index already), and the admin audit log.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Rooms {
    Table,
    HomeNode,
}

#[derive(DeriveIden)]
enum AdminAudit {
    Table,
    Id,
    At,
    Node,
    Action,
    Target,
    Detail,
    Outcome,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(Index::create().name("idx_rooms_home_node").table(Rooms::Table).col(Rooms::HomeNode).to_owned())
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AdminAudit::Table)
                    .if_not_exists()
                    .col(big_pk_auto(AdminAudit::Id))
                    // Milliseconds since the Unix epoch on the node that carried out the action.
                    .col(big_integer(AdminAudit::At))
                    .col(string_len(AdminAudit::Node, 64))
                    .col(string_len(AdminAudit::Action, 64))
                    .col(string_len(AdminAudit::Target, 128))
                    .col(text(AdminAudit::Detail))
                    .col(string_len(AdminAudit::Outcome, 16))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(AdminAudit::Table).if_exists().to_owned()).await?;
        manager.drop_index(Index::drop().name("idx_rooms_home_node").table(Rooms::Table).to_owned()).await
    }
}
