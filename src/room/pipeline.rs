//! A room's appends in flight, answered in the order they were submitted.
//!
//! The room hands up to [`super::PIPELINE_DEPTH`] appends to the committer; each one assumes
//! the ones before it commit in full, so their answers must be applied oldest first. The
//! committer answers a room's appends in that order, but the room receives each answer through
//! its own future spawned on the actor's context, and actix polls those in no fixed order (it
//! removes a finished one with `swap_remove`): two answers that are ready at the same poll can
//! be seen newest first. Matching an answer to "the oldest append in flight" then paired one
//! append's seqs with another append's posts (wrong seqs in acks and in the broadcast, seen
//! under the churn test). So every append carries a ticket, an answer that arrives early waits
//! here, and answers come out strictly oldest first.

use std::collections::VecDeque;

/// Appends in flight (`P`: what the room keeps per append) and early answers (`R`).
pub(super) struct Pipeline<P, R> {
    in_flight: VecDeque<(u64, P)>,
    /// Answers that came before an older append's, with their tickets: at most one fewer than
    /// the appends in flight, so a short list rather than a map (every loaded room holds one).
    early: Vec<(u64, R)>,
    next_ticket: u64,
}

impl<P, R> Default for Pipeline<P, R> {
    fn default() -> Self {
        Pipeline { in_flight: VecDeque::new(), early: Vec::new(), next_ticket: 0 }
    }
}

impl<P, R> Pipeline<P, R> {
    /// Record an append; its answer must be passed to [`Pipeline::answered`] with this ticket.
    pub(super) fn submit(&mut self, append: P) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.in_flight.push_back((ticket, append));
        ticket
    }

    /// The answer to append `ticket`. Returns the oldest append with its answer once that
    /// answer is here (call again with [`Pipeline::next_ready`] for the ones it unblocked);
    /// `None` if an older append is still waiting, or if `ticket` is no longer in flight (its
    /// posts were answered already when the room stopped or drained).
    pub(super) fn answered(&mut self, ticket: u64, answer: R) -> Option<(P, R)> {
        if !self.in_flight.iter().any(|(t, _)| *t == ticket) {
            return None;
        }
        self.early.push((ticket, answer));
        self.next_ready()
    }

    /// The oldest append, if its answer has arrived.
    pub(super) fn next_ready(&mut self) -> Option<(P, R)> {
        let ticket = self.in_flight.front()?.0;
        let at = self.early.iter().position(|(t, _)| *t == ticket)?;
        let (_, answer) = self.early.swap_remove(at);
        let (_, append) = self.in_flight.pop_front().expect("front exists");
        Some((append, answer))
    }

    pub(super) fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Every append in flight, oldest first (their answers, if any came, are dropped).
    pub(super) fn drain(&mut self) -> impl Iterator<Item = P> + '_ {
        self.early.clear();
        self.in_flight.drain(..).map(|(_, p)| p)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &P> {
        self.in_flight.iter().map(|(_, p)| p)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut P> {
        self.in_flight.iter_mut().map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::Pipeline;

    /// The answer of the second append arrives first (as actix may poll it): nothing comes
    /// out until the first one's answer is here, then both, oldest first, each with its own.
    #[test]
    fn answers_come_out_oldest_first_whatever_order_they_arrive_in() {
        let mut p: Pipeline<&str, u64> = Pipeline::default();
        let a = p.submit("posts of append A");
        let b = p.submit("posts of append B");
        assert_eq!(p.answered(b, 2), None, "B waits for A");
        assert_eq!(p.len(), 2);
        assert_eq!(p.answered(a, 1), Some(("posts of append A", 1)));
        assert_eq!(p.next_ready(), Some(("posts of append B", 2)));
        assert_eq!(p.next_ready(), None);
        assert!(p.is_empty());
    }

    /// Answers of appends that were drained (the room stopped and answered their posts) are
    /// ignored, and do not match a later append.
    #[test]
    fn answers_after_a_drain_are_ignored() {
        let mut p: Pipeline<&str, u64> = Pipeline::default();
        let old = p.submit("old");
        assert_eq!(p.drain().collect::<Vec<_>>(), vec!["old"]);
        let new = p.submit("new");
        assert_ne!(old, new);
        assert_eq!(p.answered(old, 9), None);
        assert_eq!(p.answered(new, 1), Some(("new", 1)));
    }
}
