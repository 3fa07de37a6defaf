//! `stoa user …`: registered users, in the store (works with the nodes stopped).

use super::UserCommand;
use crate::config::Settings;
use crate::store::Store;
use anyhow::Context as _;
use serde_json::{Value, json};
use std::path::Path;

/// The variable `stoa user add|passwd` read a password from when no `--password-file` is given.
pub const PASSWORD_ENV: &str = "STOA_PASSWORD";

/// Write a line of the audit log for a verb that changed the store directly.
pub(crate) async fn audit_cli(store: &Store, settings: &Settings, action: &str, target: &str, detail: Value) {
    let entry = crate::store::audit::AuditEntry {
        node: &settings.node.id,
        actor: &crate::store::audit::cli_actor(),
        action,
        target,
        detail: detail.as_object().cloned().unwrap_or_default(),
        outcome: "done",
    };
    if let Err(e) = store.audit(&entry).await {
        tracing::warn!(error = %e, "could not write the audit log");
    }
}

/// Run `stoa user COMMAND`. Setting a password (`add`, `passwd`) stores its argon2 hash and its
/// SCRAM credentials ([`crate::auth::Auth::set_password`]).
pub async fn run(settings: &Settings, command: UserCommand) -> anyhow::Result<()> {
    let auth = |store: Store| crate::auth::Auth::new(store, false, settings.auth.session_ttl_s);
    match command {
        UserCommand::Add { name, password, home } => {
            crate::auth::validate_user_name(&name)?;
            let home = home.map(|h| group_node(settings, &h)).transpose()?;
            let password = read_password(&name, password.password_file.as_deref())?;
            let store = super::open_store(settings).await?;
            auth(store.clone()).add_user(&name, &password).await.with_context(|| format!("adding user {name}"))?;
            if let Some(home) = &home {
                store.set_user_home(&name, home, false).await.with_context(|| format!("setting the home node of {name}"))?;
            }
            audit_cli(&store, settings, "user_add", &name, json!({"home": home.as_ref().map(|h| &h.0)})).await;
            println!("user {name} added");
        }
        UserCommand::Home { name, node } => {
            crate::auth::validate_user_name(&name)?;
            let home = group_node(settings, &node)?;
            let store = super::open_store(settings).await?;
            let before = store.user_home(&name).await?;
            let Some(before) = before else { anyhow::bail!("no user `{name}` in this group's store (accounts live in the store of their group)") };
            store.set_user_home(&name, &home, false).await.with_context(|| format!("setting the home node of {name}"))?;
            audit_cli(&store, settings, "user_home", &name, json!({"home": home.0, "was": before.map(|b| b.0)})).await;
            println!("user {name} is homed on node {home}; its next login is served there");
        }
        UserCommand::Passwd { name, password } => {
            crate::auth::validate_user_name(&name)?;
            let password = read_password(&name, password.password_file.as_deref())?;
            let store = super::open_store(settings).await?;
            auth(store.clone()).set_password(&name, &password).await.with_context(|| format!("changing the password of {name}"))?;
            audit_cli(&store, settings, "user_passwd", &name, json!({})).await;
            println!("password of {name} changed; its sessions stay valid (`stoa session kick --user {name}` ends them)");
        }
        UserCommand::Delete { name } => {
            crate::auth::validate_user_name(&name)?;
            let store = super::open_store(settings).await?;
            let sessions = store.delete_user(&name).await.with_context(|| format!("deleting user {name}"))?;
            let Some(sessions) = sessions else { anyhow::bail!("no user `{name}`") };
            audit_cli(&store, settings, "user_delete", &name, json!({"sessions_ended": sessions})).await;
            println!("user {name} deleted, {sessions} stored session(s) ended");
        }
        UserCommand::List => {
            let store = super::open_store(settings).await?;
            print!("{}", users_table(&store.list_users().await?, &store.users_without_scram().await?));
        }
    }
    Ok(())
}

/// `node` as a home node: a node of this node's group (accounts never move between groups'
/// stores), or this node when it is in no cluster.
fn group_node(settings: &Settings, node: &str) -> anyhow::Result<crate::ids::NodeId> {
    let in_group = match settings.group() {
        Some(g) => g.nodes.iter().any(|n| n.id == node),
        None => node == settings.node.id,
    };
    anyhow::ensure!(in_group, "node `{node}` is not in this node's group: a user's home is a node of the group whose store has its account");
    Ok(crate::ids::NodeId(node.to_owned()))
}

/// The password for `user`: the first line of `file`, else [`PASSWORD_ENV`], else asked twice
/// at the terminal. Checked against the password rule before anything is stored.
pub fn read_password(user: &str, file: Option<&Path>) -> anyhow::Result<String> {
    let password = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the password file {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => match std::env::var(PASSWORD_ENV) {
            Ok(p) => p,
            Err(_) => {
                let p = rpassword::prompt_password(format!("password for {user}: "))
                    .with_context(|| format!("no password: give --password-file, set {PASSWORD_ENV}, or run at a terminal"))?;
                let again = rpassword::prompt_password("again: ").context("reading the password again")?;
                anyhow::ensure!(p == again, "the two passwords differ");
                p
            }
        },
    };
    crate::auth::validate_password(&password)?;
    Ok(password)
}

/// Registered users as a table; `without_scram` (names) have no SCRAM credentials: they log in
/// over XMPP with PLAIN only until their password is set again.
pub fn users_table(users: &[(String, i64)], without_scram: &[String]) -> String {
    let mut out = format!("{:<24} {:<19} SCRAM\n", "USER", "CREATED (UTC)");
    for (name, created) in users {
        let scram = if without_scram.contains(name) { "no: set a new password (stoa user passwd)" } else { "yes" };
        out.push_str(&format!("{name:<24} {:<19} {scram}\n", crate::clock::readable_utc(*created).trim_end_matches(" UTC")));
    }
    if users.is_empty() {
        out.push_str("(no registered users)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_list_times_are_readable() {
        let t = users_table(&[("ann".into(), 0), ("bob".into(), 0)], &["bob".into()]);
        assert!(t.contains("ann") && t.contains("1970-01-01 00:00:00"), "{t}");
        assert!(t.lines().any(|l| l.starts_with("ann ") && l.ends_with(" yes")), "{t}");
        assert!(t.lines().any(|l| l.starts_with("bob ") && l.contains(" no: set a new password")), "{t}");
    }
}
