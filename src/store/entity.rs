//! SeaORM entities, one module per table (the schema itself lives in `migrations/`).

/// `rooms`: one row per persistent room; `host_node` + `epoch` are its fencing token.
pub mod room {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "rooms")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sea_orm(unique)]
        pub address: String,
        /// `RoomConfig` as JSON.
        pub config: String,
        /// Copy of `config.public`, so `list` filters in SQL.
        pub public: bool,
        pub home_node: String,
        pub host_node: String,
        pub epoch: i64,
        pub last_seq: i64,
        pub created_at: i64,
        /// `created_at` of the message at `last_seq` (0: none yet): where the room's clock resumes.
        pub last_ts: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `messages`: the room logs; primary key (room_id, seq), unique (room_id, sender, client_msg_id).
pub mod message {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "messages")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub room_id: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub id: String,
        pub sender: String,
        pub nick: String,
        pub body: String,
        pub client_msg_id: String,
        /// The room epoch this row was committed under.
        pub epoch: i64,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `affiliations`: a user's standing in a room (owner, admin, member, outcast).
pub mod affiliation {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "affiliations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub room_id: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_name: String,
        pub affiliation: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `users`: registered accounts with argon2 password hashes, and the SCRAM credentials of the
/// same password (NULL where the password was set before they were kept).
pub mod user {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub name: String,
        pub password_hash: String,
        pub created_at: i64,
        /// SCRAM-SHA-1: salt, iterations, StoredKey, ServerKey (base64 but the count).
        pub scram_sha1_salt: Option<String>,
        pub scram_sha1_iterations: Option<i32>,
        pub scram_sha1_stored_key: Option<String>,
        pub scram_sha1_server_key: Option<String>,
        /// SCRAM-SHA-256: the same.
        pub scram_sha256_salt: Option<String>,
        pub scram_sha256_iterations: Option<i32>,
        pub scram_sha256_stored_key: Option<String>,
        pub scram_sha256_server_key: Option<String>,
        /// The node of this group the user logs in on (docs/clusters.md); NULL: not assigned yet.
        pub home_node: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `sessions`: login sessions, keyed by the SHA-256 of the token (the token itself is never stored).
pub mod session {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sessions")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub token_hash: String,
        pub user_name: String,
        pub guest: bool,
        pub created_at: i64,
        pub expires_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
