//! The interface every candidate store implements, kept to what the durable
//! queue needs: durable batched append, in-order read from a cursor, and
//! reclaiming everything below a sequence number.

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub trait Store {
    /// Appends `events` with sequence numbers `first_seq..` and returns only
    /// once they are durable (one fsync-equivalent for the whole call).
    fn append(&mut self, first_seq: u64, events: &[&[u8]]) -> Result<()>;

    /// Calls `f` for every event with sequence >= `from`, in order, and
    /// returns how many were visited.
    fn read_from(&mut self, from: u64, f: &mut dyn FnMut(u64, &[u8])) -> Result<u64>;

    /// Durably discards every event with sequence < `seq`.
    fn reclaim_below(&mut self, seq: u64) -> Result<()>;

    /// Waits until background work started by earlier appends has finished,
    /// so that its writes are attributed to this store and do not overlap the
    /// next store's timed slice.
    fn quiesce(&mut self) -> Result<()> {
        Ok(())
    }

    /// Pushes data that is still only in memory or in a write-ahead log to
    /// its final place, so write amplification counts the full cost.
    fn settle(&mut self) -> Result<()> {
        Ok(())
    }

    /// Optional heavier space-reclaiming step after `reclaim_below`
    /// (compaction / VACUUM). Returns a label for the report, or `None` if
    /// the store has nothing of the kind.
    fn compact(&mut self) -> Result<Option<&'static str>> {
        Ok(None)
    }
}
