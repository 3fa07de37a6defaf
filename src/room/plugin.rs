//! The room's side of plugins: which plugins a room runs, and where their hooks sit in the
//! room's write path.
//!
//! `on-message` runs *beside* the actor, never in it: a post is put in the room's ordered
//! list of hooked posts and handed to the plugin chain at once; the actor goes on serving.
//! When a decision comes back the actor moves every post at the head of the list that has a
//! decision into the commit queue, so the committer sees posts in arrival order, exactly as
//! without plugins (docs/plugins.md, "Ordering"). Bot messages (`send`) take a place in the
//! same list, already accepted.

use super::{PendingPost, Room};
use crate::ids::{RoomAddr, SessionId};
use crate::plugin::worker::{self, Attachment, Chain, DecisionTo, PluginHandle};
use crate::plugin::{Message, Occupant, RoomInfo, RoomLink, Verdict};
use crate::protocol::{ErrorCode, RoomConfig};
use crate::room::RoomError;
use crate::store::NewMessage;
use actix::WeakAddr;
use actix::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;

/// The sender name of a plugin's bot messages.
pub fn bot_sender(plugin: &str) -> String {
    format!("bot:{plugin}")
}

/// A room's plugins and its posts waiting for their decisions.
#[derive(Default)]
pub(super) struct RoomHooks {
    chain: Chain,
    pending: VecDeque<Hooked>,
    next_ticket: u64,
    /// Where workers send decisions (a stream of the room's actor context), once started.
    decisions: Option<tokio::sync::mpsc::UnboundedSender<(u64, Verdict)>>,
}

pub(super) struct Hooked {
    ticket: u64,
    post: PendingPost,
    decision: Option<Verdict>,
}

impl RoomHooks {
    /// Posts waiting for a decision (or behind one that is).
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// The waiting posts (to find a resend of one of them).
    pub(super) fn posts_mut(&mut self) -> std::iter::Map<std::collections::vec_deque::IterMut<'_, Hooked>, fn(&mut Hooked) -> &mut PendingPost> {
        self.pending.iter_mut().map(|h| &mut h.post)
    }

    /// Take every waiting post (the room is stopping).
    pub(super) fn drain_posts(&mut self) -> Vec<PendingPost> {
        self.pending.drain(..).map(|h| h.post).collect()
    }
}

/// The link a plugin's host imports use to reach its room.
struct ActorLink(WeakAddr<Room>);

impl RoomLink for ActorLink {
    fn send(&self, plugin: &str, body: String) {
        if let Some(addr) = self.0.upgrade() {
            addr.do_send(PluginPost { plugin: plugin.to_owned(), body });
        }
    }

    fn info(&self) -> futures_util::future::BoxFuture<'static, Option<RoomInfo>> {
        let addr = self.0.upgrade();
        Box::pin(async move { addr?.send(PluginRoomInfo).await.ok() })
    }
}

/// The `(name, JSON config)` list a room with `config` runs: the node-wide plugins, then the
/// room's own (a room entry replaces a node-wide one of the same name, keeping its place).
/// Names are canonical ([`crate::plugin::canonical_name`]: `word_filter` is `word-filter`).
pub fn wanted_plugins(everywhere: &[crate::plugin::EnabledPlugin], config: &RoomConfig) -> Vec<(String, String)> {
    use crate::plugin::canonical_name;
    let mut out: Vec<(String, String)> = everywhere.iter().map(|p| (canonical_name(&p.name), plugin_config_json(&p.config))).collect();
    for p in &config.plugins {
        let name = canonical_name(&p.name);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = plugin_config_json(&p.config),
            None => out.push((name, plugin_config_json(&p.config))),
        }
    }
    out
}

/// A plugin's config as its `init` gets it (`null` is `{}`).
fn plugin_config_json(v: &serde_json::Value) -> String {
    if v.is_null() { "{}".to_owned() } else { v.to_string() }
}

/// Refuse a room plugin list that a room could not run: every plugin must be loaded here and
/// its `init` must accept its config (a throwaway instance runs it; see
/// [`crate::plugin::PluginHost::check_config`]). Checked at `create` and `configure`, so a
/// bad config is an error to its owner instead of faults in the room.
pub async fn check_room_plugins(host: Option<&crate::plugin::PluginHost>, room: &RoomAddr, plugins: &[crate::protocol::RoomPlugin]) -> Result<(), RoomError> {
    if plugins.is_empty() {
        return Ok(());
    }
    let Some(host) = host else {
        return Err(RoomError::BadRequest("this node runs no plugins".into()));
    };
    for p in plugins {
        if !crate::plugin::valid_name(&p.name) {
            return Err(RoomError::BadRequest(format!("`{}` is not a plugin name (a-z, 0-9, '-', '_'; at most 64)", p.name)));
        }
        host.check_config(&p.name, room, &plugin_config_json(&p.config)).await.map_err(RoomError::BadRequest)?;
    }
    Ok(())
}

impl Room {
    /// Start (or restart) this room's plugin workers to match its config. Unchanged plugins
    /// keep their workers.
    pub(super) fn start_plugins(&mut self, ctx: &mut Context<Self>) {
        let Some(host) = self.deps.plugins.clone() else { return };
        let wanted = wanted_plugins(host.enabled_everywhere(), &self.state.config);
        let current: Vec<(String, String)> = self.hooks.chain.iter().map(|h| (h.name.to_string(), h.config.clone())).collect();
        if wanted == current {
            return;
        }
        if self.hooks.decisions.is_none() {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
            self.hooks.decisions = Some(tx);
        }
        let link: Arc<dyn RoomLink> = Arc::new(ActorLink(ctx.address().downgrade()));
        let old = std::mem::take(&mut self.hooks.chain);
        let chain: Vec<PluginHandle> = wanted
            .into_iter()
            .map(|(name, config)| match old.iter().find(|h| *h.name == *name && h.config == config) {
                Some(h) => h.clone(),
                None => {
                    if old.iter().any(|h| *h.name == *name) {
                        // A new config for this room: its faults were the old config's.
                        host.clear_room_faults(&name, &self.addr);
                    }
                    worker::spawn(
                    &host,
                    &name,
                    config,
                    Attachment {
                        room: self.addr.clone(),
                        store: Some((self.deps.store.clone(), self.fence.clone())),
                        link: Some(link.clone()),
                        io: Some(self.deps.io.clone()),
                    },
                    worker::Runner::CurrentArbiter,
                    )
                }
            })
            .collect();
        self.hooks.chain = chain.into();
    }

    /// Queue a post for the committer, through the room's plugins if it has any. `bot` posts
    /// (a plugin's `send`) skip the hooks but keep their place in line.
    pub(super) fn enqueue_post(&mut self, post: PendingPost, bot: bool, ctx: &mut Context<Self>) {
        if self.hooks.pending.is_empty() && (bot || self.hooks.chain.is_empty()) {
            self.queue.push_back(post);
            self.flush_soon(ctx);
            return;
        }
        let ticket = self.hooks.next_ticket;
        self.hooks.next_ticket += 1;
        let decision = if bot || self.hooks.chain.is_empty() { Some(Verdict::Accept) } else { None };
        if decision.is_none() {
            let m = &post.message;
            let message = Message { sender: m.sender.clone(), nick: m.nick.clone(), body: m.body.clone(), client_msg_id: m.client_msg_id.clone() };
            let decisions = self.hooks.decisions.clone().expect("started with the chain");
            worker::start_chain(&self.hooks.chain, message, DecisionTo::Room { ticket, decisions });
        }
        self.hooks.pending.push_back(Hooked { ticket, post, decision });
        self.drain_hooked(ctx);
    }

    fn hook_decided(&mut self, ticket: u64, decision: Verdict, ctx: &mut Context<Self>) {
        // Decisions mostly come in order: the post is usually at the head.
        if let Some(h) = self.hooks.pending.iter_mut().find(|h| h.ticket == ticket) {
            h.decision = Some(decision);
        }
        self.drain_hooked(ctx);
    }

    /// Move decided posts at the head of the line to the commit queue (or answer rejections).
    fn drain_hooked(&mut self, ctx: &mut Context<Self>) {
        let mut moved = false;
        while self.hooks.pending.front().is_some_and(|h| h.decision.is_some()) {
            let h = self.hooks.pending.pop_front().expect("front exists");
            let mut post = h.post;
            match h.decision.expect("checked above") {
                Verdict::Accept => {}
                Verdict::Rewrite(body) => post.message.body = body,
                Verdict::Reject(reason) => {
                    metrics::counter!("stoa_plugin_rejected_total").increment(1);
                    self.fail_posts(vec![post], ErrorCode::Rejected, &reason);
                    continue;
                }
            }
            self.queue.push_back(post);
            moved = true;
        }
        if moved {
            self.flush_soon(ctx);
        }
    }

    /// Tell the plugins someone left.
    pub(super) fn plugins_left(&self, user: &str, nick: &str) {
        for h in self.hooks.chain.iter() {
            h.on_leave(Occupant { user: user.to_owned(), nick: nick.to_owned() });
        }
    }

    /// The config was stored: restart workers whose plugin or config changed, and tell the
    /// others.
    pub(super) fn plugins_config_changed(&mut self, ctx: &mut Context<Self>) {
        let before: Vec<Arc<str>> = self.hooks.chain.iter().map(|h| h.name.clone()).collect();
        self.start_plugins(ctx);
        let view = self.state.config.public_view().to_string();
        for h in self.hooks.chain.iter() {
            if before.contains(&h.name) {
                h.on_config_changed(view.clone());
            }
        }
    }
}

impl StreamHandler<(u64, Verdict)> for Room {
    fn handle(&mut self, (ticket, decision): (u64, Verdict), ctx: &mut Context<Self>) {
        self.hook_decided(ticket, decision, ctx);
    }

    /// The room holds a sender itself, so the stream never ends while the room lives; never
    /// stop the room because of it.
    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

/// A plugin's bot posts to the room (host import `send`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PluginPost {
    pub plugin: String,
    pub body: String,
}

impl Handler<PluginPost> for Room {
    type Result = ();

    fn handle(&mut self, msg: PluginPost, ctx: &mut Context<Self>) {
        if self.passivating {
            return;
        }
        self.touch();
        let message = NewMessage::unstamped(bot_sender(&msg.plugin), msg.plugin, msg.body, uuid::Uuid::now_v7().to_string());
        let cid = self.cids().key(&message.sender, &message.client_msg_id);
        let post = PendingPost { message, cid, waiters: Vec::new(), maybe_resent: false };
        self.enqueue_post(post, true, ctx);
    }
}

/// What a plugin's `room-info` reads.
#[derive(Message)]
#[rtype(result = "RoomInfo")]
pub struct PluginRoomInfo;

impl Handler<PluginRoomInfo> for Room {
    type Result = MessageResult<PluginRoomInfo>;

    fn handle(&mut self, _msg: PluginRoomInfo, _ctx: &mut Context<Self>) -> Self::Result {
        let mut occupants: Vec<Occupant> = self.state.occupants.values().map(|o| Occupant { user: o.user.clone(), nick: o.nick.clone() }).collect();
        occupants.sort();
        MessageResult(RoomInfo { subject: self.state.config.subject.clone(), last_seq: self.last_seq, occupants })
    }
}

/// The room's plugin chain, for `on-join` (which runs outside the actor). The join is checked
/// against the room's own rules first, so plugins only see joins the room would admit.
#[derive(Message, Clone)]
#[rtype(result = "Result<Vec<PluginHandle>, RoomError>")]
pub struct PluginChain {
    pub session: SessionId,
    pub user: String,
    pub nick: String,
    pub password: Option<String>,
}

impl Handler<PluginChain> for Room {
    type Result = Result<Vec<PluginHandle>, RoomError>;

    fn handle(&mut self, msg: PluginChain, _ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        if self.hooks.chain.is_empty() {
            return Ok(Vec::new());
        }
        self.state
            .check_join(msg.session, &msg.user, &msg.nick, msg.password.as_deref(), self.deps.limits.max_occupants)
            .map_err(RoomError::from)?;
        Ok(self.hooks.chain.to_vec())
    }
}

/// The room was just created: run `on-room-created`.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct PluginRoomCreated;

impl Handler<PluginRoomCreated> for Room {
    type Result = Result<(), RoomError>;

    fn handle(&mut self, _msg: PluginRoomCreated, _ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        for h in self.hooks.chain.iter() {
            h.on_room_created();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::EnabledPlugin;
    use crate::protocol::RoomPlugin;
    use serde_json::json;

    /// Node-wide plugins come first; a room entry of the same name replaces its config in
    /// place; other room entries follow in order; a missing config is `{}`.
    #[test]
    fn room_plugins_follow_the_node_wide_ones() {
        let everywhere = vec![
            EnabledPlugin { name: "rate-limit".into(), config: json!({"budget": 5}) },
            EnabledPlugin { name: "word-filter".into(), config: serde_json::Value::Null },
        ];
        let config = RoomConfig {
            plugins: vec![
                RoomPlugin { name: "greeter".into(), config: json!({}) },
                RoomPlugin { name: "rate-limit".into(), config: json!({"budget": 1}) },
            ],
            ..RoomConfig::default()
        };
        let wanted = wanted_plugins(&everywhere, &config);
        assert_eq!(
            wanted,
            vec![
                ("rate-limit".to_owned(), r#"{"budget":1}"#.to_owned()),
                ("word-filter".to_owned(), "{}".to_owned()),
                ("greeter".to_owned(), "{}".to_owned()),
            ]
        );
        assert!(wanted_plugins(&[], &RoomConfig::default()).is_empty());
    }
}
