//! SCRAM credentials beside the argon2 hash, for XMPP's SASL SCRAM-SHA-1 and SCRAM-SHA-256
//! (RFC 5802, RFC 7677): per hash, the salt, the iteration count, StoredKey and ServerKey
//! (base64). Setting a password fills them; users whose password was set before this migration
//! have NULL here (they log in with PLAIN until their password is set again).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Users {
    Table,
    ScramSha1Salt,
    ScramSha1Iterations,
    ScramSha1StoredKey,
    ScramSha1ServerKey,
    ScramSha256Salt,
    ScramSha256Iterations,
    ScramSha256StoredKey,
    ScramSha256ServerKey,
}

/// The new columns: base64 text (a 16-byte salt is 24 characters, a SHA-256 key 44), and the
/// iteration counts.
fn columns() -> [ColumnDef; 8] {
    [
        string_len_null(Users::ScramSha1Salt, 128),
        integer_null(Users::ScramSha1Iterations),
        string_len_null(Users::ScramSha1StoredKey, 128),
        string_len_null(Users::ScramSha1ServerKey, 128),
        string_len_null(Users::ScramSha256Salt, 128),
        integer_null(Users::ScramSha256Iterations),
        string_len_null(Users::ScramSha256StoredKey, 128),
        string_len_null(Users::ScramSha256ServerKey, 128),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        for column in columns() {
            manager.alter_table(Table::alter().table(Users::Table).add_column(column).to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in columns() {
            manager.alter_table(Table::alter().table(Users::Table).drop_column(Alias::new(column.get_column_name())).to_owned()).await?;
        }
        Ok(())
    }
}
