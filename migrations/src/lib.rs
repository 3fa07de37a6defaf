//! Schema migrations for Stoa's store (PostgreSQL, MySQL/MariaDB, SQLite).
//!
//! File names follow `mYYYYMMDD_NNNNNN_verb_noun.rs`. Migrations are run by `stoa serve` at
//! start-up and by `stoa migrate`, always under a cross-process lock held by the caller
//! (see `stoa::store::migrate`), so two nodes starting at once never race.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_create_core_tables;
mod m20261126_000002_plugins;
mod m20261126_000003_failover;
mod m20261204_000004_service_hosts;
mod m20261204_000005_audit_actor;
mod m20261204_000006_message_id_index;
mod m20261204_000007_scram_credentials;
mod m20261205_000008_room_clock;
mod m20261205_000009_merge_jobs;
mod m20261206_000010_home_node;

/// Every migration of the Stoa schema, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_create_core_tables::Migration),
            Box::new(m20261126_000002_plugins::Migration),
            Box::new(m20261126_000003_failover::Migration),
            Box::new(m20261204_000004_service_hosts::Migration),
            Box::new(m20261204_000005_audit_actor::Migration),
            Box::new(m20261204_000006_message_id_index::Migration),
            Box::new(m20261204_000007_scram_credentials::Migration),
            Box::new(m20261205_000008_room_clock::Migration),
            Box::new(m20261205_000009_merge_jobs::Migration),
            Box::new(m20261206_000010_home_node::Migration),
        ]
    }
}
