//! `stoa room …`: create, list and show in the store; configure and destroy through the admin
//! API of the node hosting the room (its actor holds the configuration and the occupants).

use super::admin::{AdminApi, path_segment};
use super::{AdminTarget, Env, RoomCommand};
use crate::ids::{NodeId, RoomAddr};
use crate::protocol::RoomConfig;
use anyhow::Context as _;
use serde_json::{Value, json};

/// Run `stoa room COMMAND`.
pub async fn run(env: &Env<'_>, target: &AdminTarget, command: RoomCommand) -> anyhow::Result<()> {
    match command {
        RoomCommand::Configure { room, subject, members_only, public, plugins, no_plugins } => {
            let plugins = if no_plugins { Some(Vec::new()) } else { (!plugins.is_empty()).then_some(plugins) };
            let members_only = if members_only { Some(true) } else { public.then_some(false) };
            anyhow::ensure!(
                subject.is_some() || members_only.is_some() || plugins.is_some(),
                "nothing to change: give --subject, --members-only, --public, --plugin or --no-plugins"
            );
            let body = json!({"subject": subject, "members_only": members_only, "plugins": plugins});
            let path = format!("/api/rooms/{}/configure", path_segment(&room));
            let answer = AdminApi::new(env.config, target)?.call("POST", &path, Some(&body)).await?;
            println!("{}", answer["message"].as_str().unwrap_or("configured"));
        }
        RoomCommand::Destroy { room, reason } => {
            let path = format!("/api/rooms/{}/destroy", path_segment(&room));
            let answer = AdminApi::new(env.config, target)?.call("POST", &path, Some(&json!({"reason": reason}))).await?;
            println!("{}", answer["message"].as_str().unwrap_or("destroyed"));
        }
        RoomCommand::Create { room, owner, members_only, subject, plugins } => {
            let settings = env.settings()?;
            let addr = RoomAddr(room);
            anyhow::ensure!(
                addr.service() == settings.node.service,
                "room {addr} is not on this node's service `{}`",
                settings.node.service
            );
            let cfg = RoomConfig { public: !members_only, subject: subject.unwrap_or_default(), plugins, ..RoomConfig::default() };
            let store = super::open_store(&settings).await?;
            store.create_room(&addr, &cfg, &owner, &NodeId(settings.node.id.clone())).await.with_context(|| format!("creating {addr}"))?;
            super::user::audit_cli(&store, &settings, "room_create", addr.as_str(), json!({"owner": owner, "public": cfg.public})).await;
            println!("room {addr} created, owner {owner}");
        }
        RoomCommand::List { limit, offset } => {
            let settings = env.settings()?;
            let store = super::open_store(&settings).await?;
            println!("{} rooms", store.count_rooms().await?);
            for r in store.list_rooms(offset, limit).await? {
                println!("{}\tlast_seq={}\thost={}\tepoch={}\tpublic={}", r.address, r.last_seq, r.host_node, r.epoch.0, r.config.public);
            }
        }
        RoomCommand::Show { room } => {
            let settings = env.settings()?;
            let store = super::open_store(&settings).await?;
            let row = store.load_room(&RoomAddr(room.clone())).await?.with_context(|| format!("no room {room}"))?;
            let affs = store.load_affiliations(row.id).await?;
            let out = json!({
                "room": row.address, "last_seq": row.last_seq, "home_node": row.home_node.0,
                "host_node": row.host_node.0, "epoch": row.epoch.0, "created_at": crate::clock::iso_utc(row.created_at),
                "config": row.config.public_view(), "affiliations": affs,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}

/// `--plugin NAME` or `--plugin 'NAME={"json":"config"}'` of `stoa room create|configure`.
pub fn parse_plugin(arg: &str) -> Result<crate::protocol::RoomPlugin, String> {
    let (name, config) = match arg.split_once('=') {
        Some((name, json)) => {
            let config: Value = serde_json::from_str(json).map_err(|e| format!("the config of plugin `{name}` is not JSON: {e}"))?;
            (name, config)
        }
        None => (arg, serde_json::json!({})),
    };
    if !crate::plugin::valid_name(name) {
        return Err(format!("`{name}` is not a plugin name (a-z, 0-9, '-', '_')"));
    }
    if !config.is_object() {
        return Err(format!("the config of plugin `{name}` must be a JSON object"));
    }
    Ok(crate::protocol::RoomPlugin { name: name.to_owned(), config })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_arguments_name_a_plugin_and_maybe_its_config() {
        assert_eq!(parse_plugin("word-filter").unwrap().config, json!({}));
        let p = parse_plugin(r#"word-filter={"words":["x"]}"#).unwrap();
        assert_eq!((p.name.as_str(), &p.config), ("word-filter", &json!({"words": ["x"]})));
        assert!(parse_plugin("Bad Name").unwrap_err().contains("plugin name"));
        assert!(parse_plugin("wf={nope").unwrap_err().contains("not JSON"));
        assert!(parse_plugin("wf=[1]").unwrap_err().contains("JSON object"));
    }

}
