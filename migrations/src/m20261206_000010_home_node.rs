//! Users' home nodes (docs/clusters.md, *Users' home nodes*): the node of the account's group
//! the user logs in on. NULL until it is assigned (`stoa user add --home`, `stoa user home`,
//! `[cluster.homes]`, or balanced at the first login).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Users {
    Table,
    HomeNode,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(Users::Table).add_column(string_len_null(Users::HomeNode, 64)).to_owned()).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(Users::Table).drop_column(Users::HomeNode).to_owned()).await
    }
}
