//! Who serves each node's room service: `service_hosts` (home_node, host_node). Rooms carry
//! their host one by one; this row carries it for the node as a whole, so that a failover of a
//! node that hosts no rooms is as durable as one that moves thousands (docs/ha.md, "Service
//! hosts"). No row means the node serves its own service.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ServiceHosts {
    Table,
    HomeNode,
    HostNode,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ServiceHosts::Table)
                    .if_not_exists()
                    .col(string_len(ServiceHosts::HomeNode, 64).primary_key())
                    .col(string_len(ServiceHosts::HostNode, 64))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(ServiceHosts::Table).if_exists().to_owned()).await
    }
}
