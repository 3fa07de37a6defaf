//! What owners and admins do to a room: subject, configuration, affiliations, kicks, destroy,
//! and what they may read of it.

use super::*;

/// Owners and admins change the subject.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct SetSubject {
    pub session: SessionId,
    pub user: String,
    pub subject: String,
}

impl Handler<SetSubject> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: SetSubject, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.check_alive().and_then(|_| self.state.check_subject(&msg.user).map_err(RoomError::from)) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let config = RoomConfig { subject: msg.subject.clone(), ..self.state.config.clone() };
        AtomicResponse::new(self.store_config(config, move |room| {
            room.broadcast_event(RoomEvent::Subject { room: room.addr.clone(), subject: msg.subject, by: msg.user });
        }))
    }
}

/// Owners change the room configuration.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Configure {
    pub user: String,
    pub patch: RoomConfigPatch,
}

impl Handler<Configure> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Configure, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.check_alive().and_then(|_| self.state.check_owner(&msg.user).map_err(RoomError::from)) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let config = self.state.config.patched(&msg.patch);
        let subject_changed = config.subject != self.state.config.subject;
        let then = move |room: &mut Room| {
            room.broadcast_event(RoomEvent::Configured { room: room.addr.clone(), config: Box::new(room.state.config.clone()) });
            if subject_changed {
                room.broadcast_event(RoomEvent::Subject {
                    room: room.addr.clone(),
                    subject: room.state.config.subject.clone(),
                    by: msg.user,
                });
            }
        };
        let Some(plugins) = msg.patch.plugins.clone() else {
            return AtomicResponse::new(self.store_config(config, then));
        };
        // A new plugin list is run by each plugin's `init` before it is stored (the room waits:
        // configure is rare, and its order with the room's other requests is kept).
        let host = self.deps.plugins.clone();
        let addr = self.addr.clone();
        let check = async move { plugin::check_room_plugins(host.as_ref(), &addr, &plugins).await };
        AtomicResponse::new(Box::pin(check.into_actor(self).then(move |checked, room, _ctx| -> ResponseActFuture<Room, Result<(), RoomError>> {
            match checked {
                Ok(()) => room.store_config(config, then),
                Err(e) => Box::pin(fut::ready(Err(e))),
            }
        })))
    }
}

impl Room {
    /// Store `config` (fenced); on success adopt it and run `then`.
    fn store_config(&mut self, config: RoomConfig, then: impl FnOnce(&mut Room) + 'static) -> ResponseActFuture<Self, Result<(), RoomError>> {
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let stored = config.clone();
        let write = self.on_io(async move { store.update_config(&fence, &stored).await });
        Box::pin(write.into_actor(self).map(move |result, room, ctx| {
            result?;
            room.state.config = config;
            then(room);
            room.plugins_config_changed(ctx);
            Ok(())
        }))
    }
}

/// Owners and admins set a user's affiliation.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Affiliate {
    pub user: String,
    pub target: String,
    pub affiliation: Affiliation,
}

impl Handler<Affiliate> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Affiliate, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self
            .check_alive()
            .and_then(|_| self.state.check_affiliate(&msg.user, &msg.target, msg.affiliation).map_err(RoomError::from))
        {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let (target, aff) = (msg.target.clone(), msg.affiliation);
        let write = self.on_io(async move { store.set_affiliation(&fence, &target, aff).await });
        AtomicResponse::new(Box::pin(write.into_actor(self).map(move |result, room, _ctx| {
            result?;
            if msg.affiliation == Affiliation::None {
                room.state.affiliations.remove(&msg.target);
            } else {
                room.state.affiliations.insert(msg.target.clone(), msg.affiliation);
            }
            let reason = if msg.affiliation == Affiliation::Outcast { "banned" } else { "membership removed" };
            for session in room.state.evicted_by(&msg.target, msg.affiliation) {
                room.remove_occupant(session, "kicked", Some(reason.into()));
            }
            Ok(())
        })))
    }
}

/// Owners and admins remove an occupant by nick.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Kick {
    pub user: String,
    pub nick: String,
    pub reason: Option<String>,
}

impl Handler<Kick> for Room {
    type Result = Result<(), RoomError>;

    fn handle(&mut self, msg: Kick, _ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        let targets = self.state.check_kick(&msg.user, &msg.nick).map_err(|d| match d {
            Denied::NotFound(m) => RoomError::Conflict(m.into()),
            other => RoomError::from(other),
        })?;
        for session in targets {
            self.remove_occupant(session, "kicked", msg.reason.clone());
        }
        Ok(())
    }
}

/// Owners destroy the room: its log, affiliations and row are deleted.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Destroy {
    pub user: String,
    pub reason: Option<String>,
}

impl Handler<Destroy> for Room {
    type Result = AtomicResponse<Self, Result<(), RoomError>>;

    fn handle(&mut self, msg: Destroy, _ctx: &mut Context<Self>) -> Self::Result {
        if let Err(e) = self.check_alive().and_then(|_| self.state.check_owner(&msg.user).map_err(RoomError::from)) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let write = self.on_io(async move { store.destroy_room(&fence).await });
        AtomicResponse::new(Box::pin(write.into_actor(self).map(move |result, room, ctx| {
            result?;
            room.passivating = true;
            room.broadcast_event(RoomEvent::Destroyed { room: room.addr.clone(), reason: msg.reason });
            for session in room.occupants.values() {
                session.exited(&room.addr);
            }
            room.occupants.clear();
            room.fail_all(ErrorCode::NotFound, "room was destroyed");
            room.registrar.passivated(&room.addr, room.incarnation);
            ctx.stop();
            Ok(())
        })))
    }
}

/// What the room's owners and admins may read: its whole configuration and its affiliations.
#[derive(Message, Clone)]
#[rtype(result = "Result<RoomAdminView, RoomError>")]
pub struct AdminView {
    pub user: String,
}

/// The answer to [`AdminView`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RoomAdminView {
    pub config: RoomConfig,
    /// Every user with an affiliation other than none, by name.
    pub affiliations: Vec<(String, Affiliation)>,
}

impl Handler<AdminView> for Room {
    type Result = Result<RoomAdminView, RoomError>;

    fn handle(&mut self, msg: AdminView, _ctx: &mut Context<Self>) -> Self::Result {
        self.check_alive()?;
        self.state.check_admin(&msg.user)?;
        let mut affiliations: Vec<(String, Affiliation)> = self.state.affiliations.iter().map(|(u, a)| (u.clone(), *a)).collect();
        affiliations.sort();
        Ok(RoomAdminView { config: self.state.config.clone(), affiliations })
    }
}
