//! Accounts: users with their argon2 hash and SCRAM credentials, and login sessions.

use super::*;

impl Store {
    /// Register a user with its password's argon2 hash and SCRAM credentials.
    /// [`StoreError::Conflict`] if the name is taken.
    pub async fn add_user(&self, name: &str, password_hash: &str, scram: &UserScram) -> Result<(), StoreError> {
        let mut row = user::ActiveModel {
            name: Set(name.to_owned()),
            password_hash: Set(password_hash.to_owned()),
            created_at: Set(now_ms()),
            ..Default::default()
        };
        scram.set_on(&mut row);
        user::Entity::insert(row).exec(&self.db).await.map_err(StoreError::classify)?;
        Ok(())
    }

    /// Where a user's account stands for a login: `None` if no user has this name, else its
    /// home node (`None` inside: not assigned yet).
    pub async fn user_home(&self, name: &str) -> Result<Option<Option<NodeId>>, StoreError> {
        Ok(user::Entity::find_by_id(name.to_owned()).one(&self.db).await?.map(|u| u.home_node.map(NodeId)))
    }

    /// Set a user's home node; false if there is no such user. With `only_if_unset`, a home
    /// already assigned stays (a first login's assignment never overrides one made meanwhile).
    pub async fn set_user_home(&self, name: &str, node: &NodeId, only_if_unset: bool) -> Result<bool, StoreError> {
        let mut update = user::Entity::update_many().col_expr(user::Column::HomeNode, Expr::value(node.0.clone())).filter(user::Column::Name.eq(name));
        if only_if_unset {
            update = update.filter(user::Column::HomeNode.is_null());
        }
        Ok(update.exec(&self.db).await?.rows_affected > 0)
    }

    /// How many users are homed on each of `nodes` (every one of them listed, 0 included).
    pub async fn users_homed_on(&self, nodes: &[NodeId]) -> Result<Vec<(NodeId, u64)>, StoreError> {
        use sea_orm::PaginatorTrait;
        let mut counts = Vec::with_capacity(nodes.len());
        for node in nodes {
            let n = user::Entity::find().filter(user::Column::HomeNode.eq(node.0.clone())).count(&self.db).await?;
            counts.push((node.clone(), n));
        }
        Ok(counts)
    }

    /// A registered user's password hash.
    pub async fn user_password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(user::Entity::find_by_id(name.to_owned()).one(&self.db).await?.map(|u| u.password_hash))
    }

    /// A registered user's SCRAM credentials (`None`: no such user).
    pub async fn user_scram(&self, name: &str) -> Result<Option<UserScram>, StoreError> {
        Ok(user::Entity::find_by_id(name.to_owned()).one(&self.db).await?.map(|u| UserScram::of(&u)))
    }

    /// Every registered user name with its creation time, by name.
    pub async fn list_users(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(user::Entity::find()
            .order_by_asc(user::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|u| (u.name, u.created_at))
            .collect())
    }

    /// The registered users without SCRAM credentials for some hash (their password was set
    /// before they were kept, or SASLprep refused it), by name.
    pub async fn users_without_scram(&self) -> Result<Vec<String>, StoreError> {
        Ok(user::Entity::find()
            .filter(Cond::any().add(user::Column::ScramSha1StoredKey.is_null()).add(user::Column::ScramSha256StoredKey.is_null()))
            .order_by_asc(user::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|u| u.name)
            .collect())
    }

    /// Record a session (by token hash).
    pub async fn create_session(&self, token_hash: &str, user: &str, guest: bool, expires_at: i64) -> Result<(), StoreError> {
        session::Entity::insert(session::ActiveModel {
            token_hash: Set(token_hash.to_owned()),
            user_name: Set(user.to_owned()),
            guest: Set(guest),
            created_at: Set(now_ms()),
            expires_at: Set(expires_at),
        })
        .exec(&self.db)
        .await
        .map_err(StoreError::classify)?;
        Ok(())
    }

    /// The (user, guest) of an unexpired session.
    pub async fn lookup_session(&self, token_hash: &str) -> Result<Option<(String, bool)>, StoreError> {
        Ok(session::Entity::find_by_id(token_hash.to_owned())
            .filter(session::Column::ExpiresAt.gt(now_ms()))
            .one(&self.db)
            .await?
            .map(|s| (s.user_name, s.guest)))
    }

    /// Delete a registered user and every session of it, in one transaction. `None` if there
    /// is no such user; else how many sessions ended. Affiliations are room state (written
    /// through the room's fenced path) and stay.
    pub async fn delete_user(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin().await?;
        let deleted = user::Entity::delete_by_id(name.to_owned()).exec(&txn).await?.rows_affected;
        if deleted == 0 {
            txn.rollback().await?;
            return Ok(None);
        }
        let sessions = session::Entity::delete_many().filter(session::Column::UserName.eq(name)).exec(&txn).await?.rows_affected;
        txn.commit().await?;
        Ok(Some(sessions))
    }

    /// Replace a registered user's password hash and SCRAM credentials (all of them: a hash
    /// `scram` lacks is cleared); false if there is no such user.
    pub async fn set_password_hash(&self, name: &str, password_hash: &str, scram: &UserScram) -> Result<bool, StoreError> {
        let mut update = user::Entity::update_many().col_expr(user::Column::PasswordHash, Expr::value(password_hash.to_owned()));
        for (column, value) in scram.columns() {
            update = update.col_expr(column, Expr::value(value));
        }
        let result = update
            .filter(user::Column::Name.eq(name))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected > 0)
    }

    /// Unexpired sessions, oldest first; only `user`'s when given.
    pub async fn list_sessions(&self, user: Option<&str>) -> Result<Vec<SessionRow>, StoreError> {
        let mut q = session::Entity::find().filter(session::Column::ExpiresAt.gt(now_ms()));
        if let Some(u) = user {
            q = q.filter(session::Column::UserName.eq(u));
        }
        Ok(q.order_by_asc(session::Column::CreatedAt)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|s| SessionRow { token_hash: s.token_hash, user: s.user_name, guest: s.guest, created_at: s.created_at, expires_at: s.expires_at })
            .collect())
    }

    /// Delete the sessions `which` names; returns them.
    pub async fn delete_sessions(&self, which: &SessionFilter) -> Result<Vec<SessionRow>, StoreError> {
        let cond = match which {
            SessionFilter::User(u) => session::Column::UserName.eq(u.as_str()),
            SessionFilter::HashPrefix(p) => session::Column::TokenHash.starts_with(p.as_str()),
        };
        let txn = self.db.begin().await?;
        let rows = session::Entity::find().filter(cond.clone()).all(&txn).await?;
        session::Entity::delete_many().filter(cond).exec(&txn).await?;
        txn.commit().await?;
        Ok(rows
            .into_iter()
            .map(|s| SessionRow { token_hash: s.token_hash, user: s.user_name, guest: s.guest, created_at: s.created_at, expires_at: s.expires_at })
            .collect())
    }
}

/// A stored login session (the token itself is never stored, only its SHA-256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub token_hash: String,
    pub user: String,
    pub guest: bool,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub expires_at: i64,
}

/// A user's SCRAM credentials for one hash (RFC 5802), as stored: the salt, StoredKey and
/// ServerKey in base64.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramRow {
    pub salt: String,
    pub iterations: u32,
    pub stored_key: String,
    pub server_key: String,
}

impl ScramRow {
    /// The row of four columns, if all are set (and the count fits).
    fn of(salt: &Option<String>, iterations: Option<i32>, stored_key: &Option<String>, server_key: &Option<String>) -> Option<ScramRow> {
        Some(ScramRow {
            salt: salt.clone()?,
            iterations: u32::try_from(iterations?).ok()?,
            stored_key: stored_key.clone()?,
            server_key: server_key.clone()?,
        })
    }
}

/// A user's SCRAM credentials, per hash; `None` where there are none (the password was set
/// before SCRAM credentials were kept, or SASLprep refused it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserScram {
    pub sha1: Option<ScramRow>,
    pub sha256: Option<ScramRow>,
}

impl UserScram {
    fn of(u: &user::Model) -> UserScram {
        UserScram {
            sha1: ScramRow::of(&u.scram_sha1_salt, u.scram_sha1_iterations, &u.scram_sha1_stored_key, &u.scram_sha1_server_key),
            sha256: ScramRow::of(&u.scram_sha256_salt, u.scram_sha256_iterations, &u.scram_sha256_stored_key, &u.scram_sha256_server_key),
        }
    }

    /// Every SCRAM column with its value (NULL for a hash without credentials).
    fn columns(&self) -> Vec<(user::Column, sea_orm::Value)> {
        use user::Column as C;
        let mut out = Vec::with_capacity(8);
        for (row, [salt, iterations, stored_key, server_key]) in [
            (&self.sha1, [C::ScramSha1Salt, C::ScramSha1Iterations, C::ScramSha1StoredKey, C::ScramSha1ServerKey]),
            (&self.sha256, [C::ScramSha256Salt, C::ScramSha256Iterations, C::ScramSha256StoredKey, C::ScramSha256ServerKey]),
        ] {
            let text = |f: fn(&ScramRow) -> &String| sea_orm::Value::from(row.as_ref().map(|r| f(r).clone()));
            out.push((salt, text(|r| &r.salt)));
            out.push((iterations, sea_orm::Value::from(row.as_ref().map(|r| i32::try_from(r.iterations).unwrap_or(i32::MAX)))));
            out.push((stored_key, text(|r| &r.stored_key)));
            out.push((server_key, text(|r| &r.server_key)));
        }
        out
    }

    /// Set the SCRAM columns of a new row.
    fn set_on(&self, row: &mut user::ActiveModel) {
        use sea_orm::ActiveModelTrait as _;
        for (column, value) in self.columns() {
            row.set(column, value);
        }
    }
}

/// Which sessions [`Store::delete_sessions`] ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionFilter {
    /// Every session of this user.
    User(String),
    /// The sessions whose token hash starts with this (lower-case hex) prefix.
    HashPrefix(String),
}
