//! COPY data buffers kept from one batch for the next. A table's COPY data is megabytes a
//! batch (12 MB for 10 000 tracks); allocated anew each time, its pages were faulted in
//! and zeroed by the kernel on every batch, 3–4 % of a warehouse load's CPU. Kept, they
//! are written over instead, within a bound on the bytes held.

use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

/// Bytes of buffers kept at most, all of them together: the COPY data of about two
/// concurrent batches of 10 000 tracks. A larger buffer is not kept.
const KEPT_BYTES: usize = 64 << 20;

#[derive(Default)]
pub struct Buffers {
    kept: Mutex<Vec<BytesMut>>,
}

impl Buffers {
    /// An empty buffer with room for `capacity` bytes: a kept one when there is one.
    pub fn take(&self, capacity: usize) -> BytesMut {
        let kept = self.lock().pop();
        match kept {
            Some(mut buffer) => {
                buffer.reserve(capacity);
                buffer
            }
            None => BytesMut::with_capacity(capacity),
        }
    }

    /// Keeps `data`'s buffer for a later `take`, when nothing else holds it any more and
    /// the bound allows; else lets it go.
    pub fn keep(&self, data: Bytes) {
        let Ok(mut buffer) = data.try_into_mut() else {
            return;
        };
        buffer.clear();
        let mut kept = self.lock();
        let held: usize = kept.iter().map(BytesMut::capacity).sum();
        if held + buffer.capacity() <= KEPT_BYTES {
            kept.push(buffer);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BytesMut>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn a_buffer_comes_back_once_nothing_else_holds_it() {
        let buffers = Buffers::default();
        let mut first = buffers.take(1 << 20);
        first.put_slice(&[7; 1000]);
        let at = first.as_ptr();
        let data = first.freeze();
        let chunk = data.slice(10..20);
        // Still sent: not kept.
        buffers.keep(data.clone());
        assert_ne!(buffers.take(16).as_ptr(), at);
        drop(chunk);
        buffers.keep(data);
        let again = buffers.take(1 << 20);
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        assert!(again.capacity() >= 1 << 20);
    }

    #[test]
    fn the_bytes_kept_are_bounded() {
        let buffers = Buffers::default();
        let big = |n| BytesMut::with_capacity(n).freeze();
        buffers.keep(big(KEPT_BYTES / 2));
        buffers.keep(big(KEPT_BYTES / 2));
        buffers.keep(big(1 << 20));
        buffers.keep(big(KEPT_BYTES + 1));
        let held: usize = buffers.lock().iter().map(BytesMut::capacity).sum();
        assert!(held <= KEPT_BYTES, "{held}");
        assert_eq!(buffers.lock().len(), 2);
    }
}
