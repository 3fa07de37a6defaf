//! The room registry: room address → the actor of its current incarnation.
//!
//! Rooms are activated on first use from the store and spread over the node's arbiters (one
//! per core) by a hash of their address. Concurrent first uses of one room wait for a single
//! activation. A room that passivates removes its own entry *before* it stops, and refuses
//! anything that still reaches it with [`RoomError::Passivating`]; callers then resolve again
//! and get the next incarnation ([`RoomRegistry::call`] does this), so no request is dropped.

use crate::ids::{NodeId, RoomAddr};
use crate::clock::monotonic_ms;
use crate::plugin::{Admission, Occupant as PluginOccupant};
use crate::protocol::RoomConfig;
use crate::room::plugin::{PluginChain, PluginRoomCreated};
use crate::room::{Activity, HandOff, PassivateIfIdle, Registrar, Room, RoomDeps, RoomError};
use crate::store::{RoomRow, Store};
use actix::dev::ToEnvelope;
use actix::prelude::*;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

type Activation = oneshot::Sender<Result<Addr<Room>, RoomError>>;

enum Slot {
    Active { addr: Addr<Room>, incarnation: u64, activity: Activity },
    Loading(Vec<Activation>),
}

struct Inner {
    node: NodeId,
    store: Store,
    slots: Mutex<HashMap<RoomAddr, Slot>>,
    arbiters: Vec<ArbiterHandle>,
    hasher: std::collections::hash_map::RandomState,
    incarnations: AtomicU64,
    /// Number of `Slot::Active` entries (kept beside the map so reading it is O(1)).
    active: AtomicU64,
    /// What every room of the node shares.
    deps: Arc<RoomDeps>,
    /// How a room tells this registry it stops: a handle on `Inner` that does not keep it
    /// alive (rooms must not keep the registry that owns them).
    registrar: Arc<dyn Registrar>,
    /// Whether this node serves rooms now (the recovery manager turns it off while the node
    /// is failed over, or fails over).
    hosting: AtomicBool,
    /// Homes whose rooms are being handed back (fallback): not activated meanwhile.
    moving_homes: Mutex<HashSet<NodeId>>,
}

/// Handle to the node's room registry; cheap to clone.
#[derive(Clone)]
pub struct RoomRegistry {
    inner: Arc<Inner>,
}

/// Rooms loaded by one store round trip of a bulk activation.
const ACTIVATION_CHUNK: usize = 1000;

/// Store round trips of a bulk activation in flight at once.
const ACTIVATION_READS_AHEAD: usize = 4;

/// How many times a request is re-resolved when it meets a stopping incarnation.
const MAX_RESOLVE_ATTEMPTS: usize = 8;

impl RoomRegistry {
    /// A registry for rooms hosted by `node`, spreading actors over `arbiters`; every room it
    /// starts gets `deps`.
    pub fn new(node: NodeId, store: Store, arbiters: Vec<ArbiterHandle>, deps: Arc<RoomDeps>) -> Self {
        assert!(!arbiters.is_empty(), "a registry needs at least one arbiter");
        RoomRegistry {
            inner: Arc::new_cyclic(|inner| Inner {
                node,
                store,
                slots: Mutex::new(HashMap::new()),
                arbiters,
                hasher: Default::default(),
                incarnations: AtomicU64::new(1),
                active: AtomicU64::new(0),
                deps,
                registrar: Arc::new(Passivations(inner.clone())),
                hosting: AtomicBool::new(true),
                moving_homes: Mutex::new(HashSet::new()),
            }),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<RoomAddr, Slot>> {
        self.inner.slots.lock().expect("registry lock poisoned")
    }

    /// Number of active rooms.
    pub fn active_count(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed) as usize
    }

    fn set_active_gauge(&self) {
        metrics::gauge!("stoa_rooms_active").set(self.active_count() as f64);
    }

    /// The actor of an already active room, without activating it.
    pub fn lookup(&self, room: &RoomAddr) -> Option<Addr<Room>> {
        match self.slots().get(room) {
            Some(Slot::Active { addr, .. }) if addr.connected() => Some(addr.clone()),
            _ => None,
        }
    }

    /// The actor of `room`, activating it from the store if needed.
    pub async fn resolve(&self, room: &RoomAddr) -> Result<Addr<Room>, RoomError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut slots = self.slots();
            match slots.get_mut(room) {
                Some(Slot::Active { addr, .. }) if addr.connected() => return Ok(addr.clone()),
                Some(Slot::Loading(waiters)) => waiters.push(tx),
                _ => {
                    if let Some(Slot::Active { .. }) = slots.insert(room.clone(), Slot::Loading(vec![tx])) {
                        // A dead incarnation that never deregistered.
                        self.inner.active.fetch_sub(1, Ordering::Relaxed);
                    }
                    // The activation runs on its own task: if this caller goes away (its
                    // connection closed), the other waiters and the slot are still settled.
                    let registry = self.clone();
                    let room = room.clone();
                    tokio::spawn(async move { registry.finish_activation(room).await });
                }
            }
        }
        rx.await.unwrap_or_else(|_| Err(RoomError::Unavailable("room activation aborted".into())))
    }

    async fn finish_activation(&self, room: RoomAddr) {
        let result = self.activate(&room).await;
        let waiters = {
            let mut slots = self.slots();
            let previous = match &result {
                Ok((addr, incarnation, activity)) => {
                    self.inner.active.fetch_add(1, Ordering::Relaxed);
                    let slot = Slot::Active { addr: addr.clone(), incarnation: *incarnation, activity: activity.clone() };
                    slots.insert(room.clone(), slot)
                }
                Err(_) => slots.remove(&room),
            };
            match previous {
                Some(Slot::Loading(waiters)) => waiters,
                _ => Vec::new(),
            }
        };
        self.set_active_gauge();
        let result = result.map(|(addr, _, _)| addr);
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }

    async fn activate(&self, room: &RoomAddr) -> Result<(Addr<Room>, u64, Activity), RoomError> {
        let started = std::time::Instant::now();
        self.check_hosting()?;
        let row = self.inner.store.load_room(room).await?.ok_or(RoomError::NotFound)?;
        if row.host_node != self.inner.node {
            return Err(RoomError::HostedBy(row.host_node));
        }
        if self.inner.moving_homes.lock().expect("registry lock poisoned").contains(&row.home_node) {
            return Err(RoomError::Unavailable(format!("room is moving back to node {}; retry", row.home_node)));
        }
        let affiliations = self.inner.store.load_affiliations(row.id).await?;
        let activated = self.start_room(row, affiliations)?;
        metrics::histogram!("stoa_room_activation_seconds").record(started.elapsed().as_secs_f64());
        Ok(activated)
    }

    /// Start the actor of a loaded room.
    fn start_room(&self, row: RoomRow, affiliations: HashMap<String, crate::protocol::Affiliation>) -> Result<(Addr<Room>, u64, Activity), RoomError> {
        let room = row.address.clone();
        let (deps, registrar) = (self.inner.deps.clone(), self.inner.registrar.clone());
        let incarnation = self.inner.incarnations.fetch_add(1, Ordering::Relaxed);
        let arbiter = &self.inner.arbiters[self.arbiter_index(&room)];
        let activity: Activity = Arc::new(AtomicU64::new(monotonic_ms()));
        let shared = activity.clone();
        let addr = Room::start_in_arbiter(arbiter, move |_ctx| Room::new(row, affiliations, incarnation, shared, deps, registrar));
        metrics::counter!("stoa_room_activations_total").increment(1);
        tracing::debug!(room = %room, incarnation, "room activated");
        Ok((addr, incarnation, activity))
    }

    /// Mark each of `rooms` not yet active or loading as loading, for
    /// [`RoomRegistry::activate_reserved`] to load in bulk: a request that reaches one of them
    /// meanwhile waits for that load instead of reading the room from the store on its own
    /// (after a takeover every client of the failed node asks at once). Returns the rooms
    /// reserved; every one of them must go to `activate_reserved`.
    pub fn reserve(&self, rooms: Vec<RoomAddr>) -> Result<Vec<RoomAddr>, RoomError> {
        self.check_hosting()?;
        let mut slots = self.slots();
        Ok(rooms
            .into_iter()
            .filter(|room| {
                let free = !slots.contains_key(room);
                if free {
                    slots.insert(room.clone(), Slot::Loading(Vec::new()));
                }
                free
            })
            .collect())
    }

    /// Load `reserved` rooms (from [`RoomRegistry::reserve`]) in chunks, one store round trip
    /// per chunk instead of two per room (a few chunks at once), start them and hand them to
    /// the requests waiting. A reserved room not started here (not hosted here, gone, or of a
    /// home being moved) is released: activated on its own if a request waits for it (which
    /// then gets the reason), forgotten otherwise; on a store error, every room not yet
    /// started is. Returns how many were started.
    pub async fn activate_reserved(&self, reserved: Vec<RoomAddr>) -> Result<usize, RoomError> {
        use futures_util::StreamExt;
        let mut started = 0;
        // A few chunks are read at once (each is a round trip the store mostly waits out),
        // and started in order.
        let (store, node) = (self.inner.store.clone(), self.inner.node.clone());
        let mut loads = futures_util::stream::iter(reserved.chunks(ACTIVATION_CHUNK).map(<[RoomAddr]>::to_vec))
            .map(move |chunk| {
                let (store, node) = (store.clone(), node.clone());
                async move {
                    let loaded = store.load_rooms_hosted(&chunk, &node).await;
                    (chunk, loaded)
                }
            })
            .buffered(ACTIVATION_READS_AHEAD)
            .enumerate();
        while let Some((i, (chunk, loaded))) = loads.next().await {
            let loaded = match loaded {
                Ok(loaded) => loaded,
                Err(e) => {
                    reserved[i * ACTIVATION_CHUNK..].iter().for_each(|room| self.release(room));
                    self.set_active_gauge();
                    return Err(e.into());
                }
            };
            let mut done: HashSet<RoomAddr> = HashSet::with_capacity(loaded.len());
            for (row, affiliations) in loaded {
                if self.inner.moving_homes.lock().expect("registry lock poisoned").contains(&row.home_node) {
                    continue;
                }
                let room = row.address.clone();
                let (addr, incarnation, activity) = match self.start_room(row, affiliations) {
                    Ok(started) => started,
                    Err(e) => {
                        reserved[i * ACTIVATION_CHUNK..].iter().for_each(|room| self.release(room));
                        self.set_active_gauge();
                        return Err(e);
                    }
                };
                let waiters = match self.slots().insert(room.clone(), Slot::Active { addr: addr.clone(), incarnation, activity }) {
                    Some(Slot::Loading(waiters)) => waiters,
                    _ => Vec::new(),
                };
                self.inner.active.fetch_add(1, Ordering::Relaxed);
                for w in waiters {
                    let _ = w.send(Ok(addr.clone()));
                }
                done.insert(room);
                started += 1;
            }
            chunk.iter().filter(|room| !done.contains(*room)).for_each(|room| self.release(room));
            // Let clients' requests in between chunks.
            tokio::task::yield_now().await;
        }
        self.set_active_gauge();
        Ok(started)
    }

    /// A reserved room that the bulk load did not start: activate it on its own for the
    /// requests waiting for it, or forget the reservation. (A room already started is left.)
    fn release(&self, room: &RoomAddr) {
        let mut slots = self.slots();
        match slots.get(room) {
            Some(Slot::Loading(waiters)) if waiters.is_empty() => {
                slots.remove(room);
            }
            Some(Slot::Loading(_)) => {
                let (registry, room) = (self.clone(), room.clone());
                tokio::spawn(async move { registry.finish_activation(room).await });
            }
            _ => {}
        }
    }

    fn arbiter_index(&self, room: &RoomAddr) -> usize {
        
        
        (self.inner.hasher.hash_one(room) % self.inner.arbiters.len() as u64) as usize
    }

    /// Ask every room that has seen no traffic for `after` to passivate, every `after / 4`
    /// (at most every 10 s), until `shutdown`. Rooms decide themselves (they may have occupants).
    pub fn start_sweeper(&self, after: Duration, shutdown: CancellationToken) {
        let registry = self.clone();
        let every = (after / 4).clamp(Duration::from_millis(10), Duration::from_secs(10));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.cancelled() => return,
                }
                let cutoff = monotonic_ms().saturating_sub(after.as_millis() as u64);
                let idle: Vec<Addr<Room>> = registry
                    .slots()
                    .values()
                    .filter_map(|s| match s {
                        Slot::Active { addr, activity, .. } if activity.load(Ordering::Relaxed) <= cutoff => Some(addr.clone()),
                        _ => None,
                    })
                    .collect();
                for addr in idle {
                    addr.do_send(PassivateIfIdle { after });
                }
            }
        });
    }

    /// Called by a room that is stopping: forget it if it is still the current incarnation.
    pub fn forget(&self, room: &RoomAddr, incarnation: u64) {
        let mut slots = self.slots();
        if matches!(slots.get(room), Some(Slot::Active { incarnation: i, .. }) if *i == incarnation) {
            slots.remove(room);
            self.inner.active.fetch_sub(1, Ordering::Relaxed);
        }
        drop(slots);
        self.set_active_gauge();
    }

    /// Send `msg` to the room's current incarnation, resolving again if it meets a stopping one.
    pub async fn call<M>(&self, room: &RoomAddr, msg: M) -> Result<M::Result, RoomError>
    where
        M: Message + Clone + Send + 'static,
        M::Result: Send + IsPassivating,
        Room: Handler<M>,
        <Room as Actor>::Context: ToEnvelope<Room, M>,
    {
        for _ in 0..MAX_RESOLVE_ATTEMPTS {
            let addr = self.resolve(room).await?;
            match addr.send(msg.clone()).await {
                Ok(r) if r.is_passivating() => continue,
                Ok(r) => return Ok(r),
                Err(MailboxError::Closed) => continue,
                Err(MailboxError::Timeout) => return Err(RoomError::Unavailable("room did not answer".into())),
            }
        }
        Err(RoomError::Unavailable("room keeps restarting; retry".into()))
    }

    /// Create a room hosted (and homed) on this node; `owner` becomes its owner.
    /// Its plugin list is checked first ([`crate::room::plugin::check_room_plugins`]).
    pub async fn create(&self, room: &RoomAddr, config: &RoomConfig, owner: &str) -> Result<RoomRow, RoomError> {
        self.check_hosting()?;
        crate::room::plugin::check_room_plugins(self.inner.deps.plugins.as_ref(), room, &config.plugins).await?;
        match self.inner.store.create_room(room, config, owner, &self.inner.node).await {
            Ok(row) => Ok(row),
            Err(crate::store::StoreError::Conflict) => Err(RoomError::Conflict("room already exists".into())),
            Err(e) => Err(e.into()),
        }
    }
}

/// The registry as its rooms see it (a weak handle: a room outliving the registry at
/// shutdown has no one to tell).
struct Passivations(Weak<Inner>);

impl Registrar for Passivations {
    fn passivated(&self, room: &RoomAddr, incarnation: u64) {
        if let Some(inner) = self.0.upgrade() {
            RoomRegistry { inner }.forget(room, incarnation);
        }
    }
}

impl RoomRegistry {
    /// Run the room's `on-join` hooks for a join (outside the room actor, so a slow plugin
    /// holds up this join only). A denial is [`RoomError::Rejected`]; a join the room itself
    /// would refuse gets the room's error without running any plugin.
    pub async fn check_join(&self, room: &RoomAddr, join: PluginChain) -> Result<(), RoomError> {
        let (user, nick) = (join.user.clone(), join.nick.clone());
        let chain = self.call(room, join).await.and_then(|r| r)?;
        for h in chain {
            if let Admission::Deny(reason) = h.on_join(PluginOccupant { user: user.clone(), nick: nick.clone() }).await {
                return Err(RoomError::Rejected(reason));
            }
        }
        Ok(())
    }

    /// After a room was created: run `on-room-created` if the room has any plugin, on the
    /// node (`node_plugins`) or its own (this activates the room).
    pub async fn room_created(&self, node_plugins: bool, room: &RoomAddr, config: &RoomConfig) {
        if !node_plugins && config.plugins.is_empty() {
            return;
        }
        if let Err(e) = self.call(room, PluginRoomCreated).await.and_then(|r| r) {
            tracing::warn!(room = %room, error = %e, "on-room-created not run");
        }
    }

    fn check_hosting(&self) -> Result<(), RoomError> {
        if self.inner.hosting.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(RoomError::Unavailable(format!("node {} does not serve rooms now (failed over); use its peer", self.inner.node)))
        }
    }

    /// Serve rooms (again), or stop activating any.
    pub fn set_hosting(&self, hosting: bool) {
        self.inner.hosting.store(hosting, Ordering::Release);
    }

    /// Whether this node serves rooms now.
    pub fn is_hosting(&self) -> bool {
        self.inner.hosting.load(Ordering::Acquire)
    }

    /// Activate none of `home`'s rooms until [`RoomRegistry::unblock_home`] (fallback).
    pub fn block_home(&self, home: &NodeId) {
        self.inner.moving_homes.lock().expect("registry lock poisoned").insert(home.clone());
    }

    pub fn unblock_home(&self, home: &NodeId) {
        self.inner.moving_homes.lock().expect("registry lock poisoned").remove(home);
    }

    /// The `rooms` critical service's probe: every arbiter (room thread) runs a task within
    /// `limit`. A wedged arbiter (a room stuck in a loop) fails it.
    pub async fn probe(&self, limit: Duration) -> bool {
        let mut answers = Vec::with_capacity(self.inner.arbiters.len());
        for arbiter in &self.inner.arbiters {
            let (tx, rx) = oneshot::channel::<()>();
            if !arbiter.spawn(async move {
                let _ = tx.send(());
            }) {
                return false;
            }
            answers.push(rx);
        }
        matches!(tokio::time::timeout(limit, futures_util::future::join_all(answers)).await, Ok(r) if r.iter().all(Result::is_ok))
    }

    /// Addresses of the active rooms.
    pub fn active_addresses(&self) -> Vec<RoomAddr> {
        self.slots()
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Active { .. }))
            .map(|(room, _)| room.clone())
            .collect()
    }

    /// Hand off every active room (only `only_home`'s, if given): each finishes its appends in
    /// flight, tells its occupants `moved` to `to`, and stops. Returns how many stopped, once
    /// all have (or, after `timeout`, how many had). Call after
    /// [`RoomRegistry::set_hosting`]`(false)` or [`RoomRegistry::block_home`], so nothing
    /// re-activates them meanwhile.
    pub async fn hand_off(&self, only_home: Option<&NodeId>, to: &str, timeout: Duration) -> usize {
        use futures_util::StreamExt;
        let addrs: Vec<Addr<Room>> = self
            .slots()
            .values()
            .filter_map(|slot| match slot {
                Slot::Active { addr, .. } => Some(addr.clone()),
                Slot::Loading(_) => None,
            })
            .collect();
        let mut waits = futures_util::stream::FuturesUnordered::new();
        for addr in addrs {
            let (done, rx) = oneshot::channel();
            addr.do_send(HandOff { only_home: only_home.cloned(), to: to.to_owned(), done });
            waits.push(rx);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut stopped = 0;
        while let Ok(Some(result)) = tokio::time::timeout_at(deadline, waits.next()).await {
            // A dropped sender means the room stopped anyway (fenced, or its arbiter ended).
            if !matches!(result, Ok(false)) {
                stopped += 1;
            }
        }
        if !waits.is_empty() {
            tracing::warn!(stopped, left = waits.len(), "rooms did not finish their hand-off in time");
        }
        stopped
    }
}

/// Room answers that mean "this incarnation is stopping; resolve again".
pub trait IsPassivating {
    fn is_passivating(&self) -> bool;
}

impl<T> IsPassivating for Result<T, RoomError> {
    fn is_passivating(&self) -> bool {
        matches!(self, Err(RoomError::Passivating))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::committer::Committer;
    use crate::config::CommitterSettings;
    use crate::ha::gate::WriteGate;
    use crate::room::RoomLimits;

    /// After a takeover every client of the failed node asks for its rooms at once: a request
    /// for a reserved room waits for the bulk load (it does not read the room itself), and a
    /// reserved room the load does not start is activated for its waiters (who get the reason)
    /// or forgotten.
    #[test]
    fn requests_for_reserved_rooms_wait_for_the_bulk_activation() {
        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::connect(&format!("sqlite://{}/rooms.db", dir.path().display()), 2, "normal").await.unwrap();
            store.migrate().await.unwrap();
            let addr = |name: &str| RoomAddr(format!("{name}@conference.localhost"));
            let (here, there) = (NodeId("n1".into()), NodeId("n2".into()));
            store.bulk_create_rooms(&[addr("a"), addr("b")], &RoomConfig::default(), "ann", &here).await.unwrap();
            store.bulk_create_rooms(&[addr("elsewhere")], &RoomConfig::default(), "ann", &there).await.unwrap();
            let stop = CancellationToken::new();
            let (committer, _task) = Committer::start(store.clone(), &CommitterSettings::default(), WriteGate::always_open(), stop.clone());
            let deps = Arc::new(RoomDeps {
                store: store.clone(),
                committer,
                limits: RoomLimits { join_replay_limit: 100, max_occupants: 100, recent_cache: 8 },
                io: tokio::runtime::Handle::current(),
                peer_client: None,
                plugins: None,
            });
            let registry = RoomRegistry::new(here, store.clone(), vec![actix::Arbiter::current()], deps);

            let reserved = registry.reserve(vec![addr("a"), addr("b"), addr("elsewhere"), addr("missing")]).unwrap();
            assert_eq!(reserved.len(), 4);
            assert!(registry.reserve(vec![addr("a")]).unwrap().is_empty(), "a room is reserved once");
            let waiting = |room: RoomAddr| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.resolve(&room).await })
            };
            let (a, elsewhere) = (waiting(addr("a")), waiting(addr("elsewhere")));
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!a.is_finished() && !elsewhere.is_finished(), "requests wait for the bulk load");

            assert_eq!(registry.activate_reserved(reserved).await.unwrap(), 2);
            assert!(a.await.unwrap().is_ok(), "the waiting request gets the room the load started");
            assert!(registry.lookup(&addr("b")).is_some(), "a room nobody waited for is active too");
            match elsewhere.await.unwrap() {
                Err(RoomError::HostedBy(node)) => assert_eq!(node.0, "n2"),
                other => panic!("a room hosted elsewhere: {:?}", other.map(|_| ())),
            }
            assert!(matches!(registry.resolve(&addr("missing")).await, Err(RoomError::NotFound)), "a missing room's reservation is gone");
            assert_eq!(registry.active_count(), 2);
            stop.cancel();
            store.close().await;
        });
    }
}
