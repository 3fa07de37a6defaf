//! `stoa db merge` jobs (docs/merge.md): `merge_jobs`, one row per job with its options,
//! validation report, counts and verification as JSON, and `merge_chunks`, one row per chunk of
//! work done, written in the same transaction as the rows the chunk copies (that is what makes a
//! killed merge resumable to the identical result).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum MergeJobs {
    Table,
    Id,
    State,
    StartedAt,
    FinishedAt,
    Sources,
    Options,
    Report,
    Counts,
    Verification,
    Error,
}

#[derive(DeriveIden)]
enum MergeChunks {
    Table,
    JobId,
    Chunk,
    RowCount,
    DoneAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(MergeJobs::Table)
                    .if_not_exists()
                    .col(string_len(MergeJobs::Id, 36).primary_key())
                    // planned, running, done, failed
                    .col(string_len(MergeJobs::State, 16))
                    // Milliseconds since the Unix epoch (the merging machine's clock).
                    .col(big_integer(MergeJobs::StartedAt))
                    .col(big_integer_null(MergeJobs::FinishedAt))
                    // JSON: the sources (URLs without passwords) and the target, in order.
                    .col(text(MergeJobs::Sources))
                    // JSON: the conflict rules and the fingerprint of the sources.
                    .col(text(MergeJobs::Options))
                    // JSON: the validation report and the plan (per source counts, conflicts).
                    .col(text(MergeJobs::Report))
                    .col(text(MergeJobs::Counts))
                    .col(text_null(MergeJobs::Verification))
                    .col(text_null(MergeJobs::Error))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(MergeChunks::Table)
                    .if_not_exists()
                    .col(string_len(MergeChunks::JobId, 36))
                    // `users/0`, `room/<n>`, `room/<n>/messages/<k>`, `room/<n>/end`.
                    .col(string_len(MergeChunks::Chunk, 64))
                    .col(big_integer(MergeChunks::RowCount))
                    .col(big_integer(MergeChunks::DoneAt))
                    .primary_key(Index::create().col(MergeChunks::JobId).col(MergeChunks::Chunk))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(MergeChunks::Table).if_exists().to_owned()).await?;
        manager.drop_table(Table::drop().table(MergeJobs::Table).if_exists().to_owned()).await
    }
}
