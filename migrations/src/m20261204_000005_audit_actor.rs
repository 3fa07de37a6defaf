//! The admin audit log records who acted: which admin credential (a fingerprint of the admin
//! token, never the token), the node link, or the command line (`cli:<unix user>`).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AdminAudit {
    Table,
    Actor,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(AdminAudit::Table)
                    // Lines written before this migration (and by writers that do not know
                    // the actor) have an empty actor.
                    .add_column(string_len(AdminAudit::Actor, 128).default(""))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(AdminAudit::Table).drop_column(AdminAudit::Actor).to_owned()).await
    }
}
