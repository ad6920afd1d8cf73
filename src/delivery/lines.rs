//! Messages read from the queue and waiting for a batch: one line per user, in queue
//! order, and a heap of the heads of the lines that are free (their user has no batch
//! unsettled). A batch takes messages in queue order from free lines only, so a user
//! with a retrying batch waits while everyone else goes on; each message costs a heap
//! operation, whatever is held back.
//!
//! A user is busy while a batch holds any of its messages: `batch_started` and
//! `batch_settled` count that. User 0 (no id) is never held.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use super::batch::{Item, Origin};

#[derive(Default)]
struct Line {
    items: VecDeque<Item>,
    bytes: usize,
    held: bool,
}

#[derive(Default)]
pub struct Lines {
    lines: HashMap<u64, Line>,
    /// Users with messages in unsettled batches: how many.
    busy: HashMap<u64, usize>,
    /// (sequence number of a free line's head, user). Entries go stale when the head is
    /// taken or the user is held; they are dropped when they surface.
    heads: BinaryHeap<Reverse<(u64, u64)>>,
    free_count: usize,
    free_bytes: usize,
    held_bytes: usize,
}

fn seq_of(item: &Item) -> u64 {
    match item.origin {
        Origin::Queue { seq } => seq,
        Origin::Replay { .. } => u64::MAX,
    }
}

/// Queue messages of identified users keep their user's order; replays and anonymous
/// messages do not.
fn counts_for_ordering(item: &Item) -> bool {
    item.user != 0 && matches!(item.origin, Origin::Queue { .. })
}

/// Bytes a message takes in a request body: itself and one separator.
pub fn wire_len(item: &Item) -> usize {
    item.json.len() + 1
}

impl Lines {
    /// Messages free to go now.
    pub fn free_count(&self) -> usize {
        self.free_count
    }

    /// Their request-body bytes.
    pub fn free_bytes(&self) -> usize {
        self.free_bytes
    }

    /// Bytes held back behind users' unsettled batches.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    pub fn push(&mut self, item: Item) {
        let (seq, user, bytes) = (seq_of(&item), item.user, wire_len(&item));
        let line = self.lines.entry(user).or_default();
        line.items.push_back(item);
        line.bytes += bytes;
        if line.held {
            self.held_bytes += bytes;
        } else {
            self.free_count += 1;
            self.free_bytes += bytes;
            if line.items.len() == 1 {
                self.heads.push(Reverse((seq, user)));
            }
        }
    }

    /// A batch of `items` started: their users are busy until it settles.
    pub fn batch_started(&mut self, items: &[Item]) {
        for item in items.iter().filter(|i| counts_for_ordering(i)) {
            *self.busy.entry(item.user).or_insert(0) += 1;
            self.hold(item.user);
        }
    }

    /// A batch of `items` settled: users with no other unsettled batch are free again.
    pub fn batch_settled(&mut self, items: &[Item]) {
        for item in items.iter().filter(|i| counts_for_ordering(i)) {
            let Some(count) = self.busy.get_mut(&item.user) else {
                continue;
            };
            *count -= 1;
            if *count == 0 {
                self.busy.remove(&item.user);
                self.release(item.user);
            }
        }
    }

    /// `user` has a batch unsettled: its waiting messages, and those pushed from now on,
    /// stay until `release`.
    fn hold(&mut self, user: u64) {
        if user == 0 {
            return;
        }
        let line = self.lines.entry(user).or_default();
        if !line.held {
            line.held = true;
            self.free_count -= line.items.len();
            self.free_bytes -= line.bytes;
            self.held_bytes += line.bytes;
        }
    }

    /// `user`'s batch settled: its messages may go again.
    fn release(&mut self, user: u64) {
        let Some(line) = self.lines.get_mut(&user) else {
            return;
        };
        if line.held {
            line.held = false;
            self.free_count += line.items.len();
            self.free_bytes += line.bytes;
            self.held_bytes -= line.bytes;
            match line.items.front() {
                Some(head) => self.heads.push(Reverse((seq_of(head), user))),
                None => {
                    self.lines.remove(&user);
                }
            }
        }
    }

    /// The oldest free message.
    pub fn oldest_free(&mut self) -> Option<&Item> {
        let user = self.valid_head()?.1;
        self.lines.get(&user)?.items.front()
    }

    /// Drops stale heap entries; returns the valid minimum, left in the heap.
    fn valid_head(&mut self) -> Option<(u64, u64)> {
        while let Some(&Reverse((seq, user))) = self.heads.peek() {
            let valid = self
                .lines
                .get(&user)
                .is_some_and(|l| !l.held && l.items.front().is_some_and(|h| seq_of(h) == seq));
            if valid {
                return Some((seq, user));
            }
            self.heads.pop();
        }
        None
    }

    /// Takes up to `max_events` free messages, in queue order, within `max_bytes` (at
    /// least one). The caller holds the users of what it took.
    pub fn take(&mut self, max_events: usize, max_bytes: usize) -> Vec<Item> {
        let mut taken = Vec::new();
        let mut bytes = 0;
        while taken.len() < max_events {
            let Some((_, user)) = self.valid_head() else {
                break;
            };
            let line = self.lines.get_mut(&user).expect("valid head has a line");
            let size = wire_len(line.items.front().expect("valid head has an item"));
            if !taken.is_empty() && bytes + size > max_bytes {
                break;
            }
            self.heads.pop();
            let item = line.items.pop_front().expect("checked above");
            line.bytes -= size;
            self.free_count -= 1;
            self.free_bytes -= size;
            bytes += size;
            match line.items.front() {
                Some(next) => self.heads.push(Reverse((seq_of(next), user))),
                None => {
                    self.lines.remove(&user);
                }
            }
            taken.push(item);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn item(seq: u64, user: u64) -> Item {
        Item {
            origin: Origin::Queue { seq },
            source: "s".into(),
            json: format!("{{\"n\":{seq}}}").into_bytes(),
            user,
            read_at: Instant::now(),
            earlier: None,
        }
    }

    fn seqs(items: &[Item]) -> Vec<u64> {
        items.iter().map(seq_of).collect()
    }

    #[test]
    fn takes_in_queue_order_across_users() {
        let mut lines = Lines::default();
        for (seq, user) in [(0, 1), (1, 2), (2, 1), (3, 0), (4, 2)] {
            lines.push(item(seq, user));
        }
        assert_eq!(lines.free_count(), 5);
        assert_eq!(seqs(&lines.take(3, usize::MAX)), [0, 1, 2]);
        assert_eq!(seqs(&lines.take(10, usize::MAX)), [3, 4]);
        assert_eq!(lines.free_count(), 0);
        assert!(lines.take(10, usize::MAX).is_empty());
    }

    #[test]
    fn a_held_user_waits_and_others_pass() {
        let mut lines = Lines::default();
        for (seq, user) in [(0, 1), (1, 1), (2, 2), (3, 1), (4, 0)] {
            lines.push(item(seq, user));
        }
        let first = lines.take(1, usize::MAX);
        assert_eq!(seqs(&first), [0]);
        lines.batch_started(&first);
        assert_eq!(lines.free_count(), 2);
        assert!(lines.held_bytes() > 0);
        lines.push(item(5, 1));
        lines.push(item(6, 2));
        assert_eq!(seqs(&lines.take(10, usize::MAX)), [2, 4, 6]);
        lines.batch_settled(&first);
        assert_eq!(lines.held_bytes(), 0);
        assert_eq!(seqs(&lines.take(10, usize::MAX)), [1, 3, 5]);
    }

    #[test]
    fn respects_bytes_but_takes_at_least_one() {
        let mut lines = Lines::default();
        for seq in 0..4 {
            lines.push(item(seq, 9));
        }
        let one = wire_len(&item(0, 9));
        assert_eq!(seqs(&lines.take(10, 1)), [0]);
        assert_eq!(seqs(&lines.take(10, 2 * one)), [1, 2]);
        assert_eq!(lines.free_bytes(), one);
    }
}
