//! Users' home nodes (docs/clusters.md, *Users' home nodes*): which node of the cluster serves
//! a registered user's logins, decided from the user name before the credentials are checked.
//!
//! [`place`] is the decision itself, pure. [`Directory`] answers "where is this user's home?"
//! from this node's store (assigning a home to a user without one); the node link asks it for
//! the other nodes. [`Placer`] is the gateway's [`crate::gateway::Homes`]: this node's store
//! first, then the other groups over the node link, then [`place`] with the link's view of who
//! serves the home's rooms now.

use crate::config::Settings;
use crate::gateway::{Homes, Placement};
use crate::ha::link::{HomeDirectory, Link};
use crate::ids::NodeId;
use crate::store::{Store, StoreError};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;

/// How long a login waits for the other groups to say where a user's home is.
const HOME_QUESTION_WAIT: Duration = Duration::from_secs(2);

/// Where a registered user's login is served, given this node (`me`), the user's `home`,
/// whether the home is a node of this node's group (its store has the account), and the node
/// the link says serves the home's room service now (`serving`: the home itself, or its peer
/// after a takeover; never `me`, whose own view is not in the link).
pub fn place(me: &NodeId, home: &NodeId, same_group: bool, serving: Option<&NodeId>) -> Placement {
    if home == me {
        return Placement::Here;
    }
    match serving {
        Some(node) if node == me => Placement::Here,
        Some(node) => Placement::Elsewhere(node.clone()),
        // The home is this node's peer and serves nothing (dead, cut off, or failed over to
        // this node): this node has the store and the rooms.
        None if same_group => Placement::Here,
        None => Placement::HomeDown(home.clone()),
    }
}

/// The home node of the users whose accounts are in this node's store.
pub struct Directory {
    settings: Arc<Settings>,
    store: Store,
}

impl Directory {
    pub fn new(settings: Arc<Settings>, store: Store) -> Self {
        Directory { settings, store }
    }

    /// `user`'s home node, assigned now if it has none; `None` if this store has no such user.
    pub async fn home_of(&self, user: &str) -> Result<Option<NodeId>, StoreError> {
        match self.store.user_home(user).await? {
            None => Ok(None),
            Some(Some(home)) => Ok(Some(home)),
            Some(None) => self.assign(user).await.map(Some),
        }
    }

    /// Give `user` a home: `[cluster.homes]`'s if it names a node of this group, else the node
    /// of this group with the fewest users homed on it (ties: this node). Conditional, so a
    /// home assigned meanwhile (another login, the admin) wins; that one is returned.
    async fn assign(&self, user: &str) -> Result<NodeId, StoreError> {
        let me = NodeId(self.settings.node.id.clone());
        let group: Vec<NodeId> = match self.settings.group() {
            Some(g) => g.nodes.iter().map(|n| NodeId(n.id.clone())).collect(),
            None => vec![me.clone()],
        };
        let configured = self.settings.cluster.homes.get(user).map(|n| NodeId(n.clone())).filter(|n| group.contains(n));
        let chosen = match configured {
            Some(node) => node,
            None => least_loaded(&me, &self.store.users_homed_on(&group).await?),
        };
        if self.store.set_user_home(user, &chosen, true).await? {
            tracing::info!(user, home = %chosen, "home node assigned");
            return Ok(chosen);
        }
        Ok(self.store.user_home(user).await?.flatten().unwrap_or(chosen))
    }
}

/// The node with the fewest users homed on it; `me` among the fewest wins a tie, else the first.
fn least_loaded(me: &NodeId, counts: &[(NodeId, u64)]) -> NodeId {
    let fewest = counts.iter().map(|(_, n)| *n).min().unwrap_or(0);
    let mut candidates = counts.iter().filter(|(_, n)| *n == fewest).map(|(node, _)| node);
    let first = candidates.clone().next().cloned().unwrap_or_else(|| me.clone());
    if candidates.any(|node| node == me) { me.clone() } else { first }
}

impl HomeDirectory for Directory {
    fn home_of(&self, user: String) -> BoxFuture<'static, Option<String>> {
        let directory = Directory { settings: self.settings.clone(), store: self.store.clone() };
        async move {
            match directory.home_of(&user).await {
                Ok(home) => home.map(|h| h.0),
                Err(e) => {
                    tracing::warn!(error = %e, "home_of: the store failed");
                    None
                }
            }
        }
        .boxed()
    }
}

/// The gateway's view of users' homes in a cluster of two groups or more.
pub struct Placer {
    directory: Directory,
    link: Link,
}

impl Placer {
    pub fn new(directory: Directory, link: Link) -> Self {
        Placer { directory, link }
    }

    /// The user's home: from this node's store (same group), else from the first node of
    /// another group that knows it.
    async fn find_home(&self, user: &str) -> Result<Option<(NodeId, bool)>, StoreError> {
        if let Some(home) = self.directory.home_of(user).await? {
            return Ok(Some((home, true)));
        }
        let settings = &self.directory.settings;
        let mine = settings.group().map(|g| g.name.clone());
        let others = settings.cluster.groups.iter().filter(|g| Some(&g.name) != mine.as_ref());
        // One question per other group, to the first of its nodes that is reachable.
        let questions = others.filter_map(|g| g.nodes.iter().map(|n| NodeId(n.id.clone())).find(|n| self.link.is_up(n)));
        let mut asked: futures_util::stream::FuturesUnordered<_> =
            questions.map(|node| async move { self.link.home_of(&node, user, HOME_QUESTION_WAIT).await }).collect();
        use futures_util::StreamExt;
        while let Some(answer) = asked.next().await {
            if let Some(home) = answer.filter(|h| settings.node_of_topology(h).is_some()) {
                return Ok(Some((NodeId(home), false)));
            }
        }
        Ok(None)
    }
}

impl Homes for Placer {
    fn place<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<Placement, String>> {
        async move {
            let me = NodeId(self.directory.settings.node.id.clone());
            let (home, same_group) = match self.find_home(user).await {
                Ok(Some(found)) => found,
                // Unknown everywhere: the login goes on here and fails as unknown users do.
                Ok(None) => return Ok(Placement::Here),
                Err(e) => return Err(e.to_string()),
            };
            let service = self.directory.settings.node_of_topology(&home.0).map(|n| n.service.clone()).unwrap_or_default();
            Ok(place(&me, &home, same_group, self.link.host_of(&service).as_ref()))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: &str) -> NodeId {
        NodeId(id.to_owned())
    }

    #[test]
    fn the_home_serves_its_users_and_its_peer_stands_in_only_when_it_serves_nothing() {
        let (a, b, c) = (n("1a"), n("1b"), n("2a"));
        // On the home itself.
        assert_eq!(place(&a, &a, true, None), Placement::Here);
        // On the home's peer: redirected while the home serves, served while it does not.
        assert_eq!(place(&b, &a, true, Some(&a)), Placement::Elsewhere(a.clone()));
        assert_eq!(place(&b, &a, true, None), Placement::Here);
        // On another group's node: to the home, or to its peer after a takeover there.
        assert_eq!(place(&c, &a, false, Some(&a)), Placement::Elsewhere(a.clone()));
        assert_eq!(place(&c, &a, false, Some(&b)), Placement::Elsewhere(b.clone()));
        // The home's group serves nothing: refused, naming the home.
        assert_eq!(place(&c, &a, false, None), Placement::HomeDown(a.clone()));
    }

    #[test]
    fn the_least_loaded_node_gets_new_users_and_a_tie_stays_here() {
        let (a, b) = (n("1a"), n("1b"));
        assert_eq!(least_loaded(&b, &[(a.clone(), 3), (b.clone(), 4)]), a);
        assert_eq!(least_loaded(&b, &[(a.clone(), 3), (b.clone(), 3)]), b);
        assert_eq!(least_loaded(&a, &[(a.clone(), 5), (b.clone(), 0)]), b);
        assert_eq!(least_loaded(&a, &[]), a);
    }
}
