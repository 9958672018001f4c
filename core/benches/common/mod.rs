//! What the benches share: the seed design they compare against (ids kept as
//! strings twice, a `HashSet<String>` for lookups and a `VecDeque<String>` for
//! eviction order, and one channel message per fresh event), and the
//! UUID-like ids they feed it.

use std::collections::{HashSet, VecDeque};
use tidemark_core::Rng;

/// Writes a UUID-like id into `buf` and returns it, without allocating.
pub fn uuid_like<'a>(rng: &mut Rng, buf: &'a mut [u8; 36]) -> &'a str {
    use std::io::Write;
    let (a, b) = (rng.next_u64(), rng.next_u64());
    write!(
        &mut buf[..],
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
    .expect("36 bytes");
    std::str::from_utf8(buf).expect("ascii")
}

/// The window both designs use.
pub const WINDOW: usize = 1024;

/// One stream of the seed design.
pub struct SeedTracker {
    seen: HashSet<String>,
    order: VecDeque<String>,
    last: String,
    tx: async_channel::Sender<String>,
}

impl SeedTracker {
    /// An empty tracker sending its cursor updates to `tx`.
    pub fn new(tx: async_channel::Sender<String>) -> Self {
        SeedTracker {
            seen: HashSet::new(),
            order: VecDeque::new(),
            last: String::new(),
            tx,
        }
    }

    /// Whether `id` is fresh; remembers it.
    #[inline]
    pub fn observe(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(id.to_owned());
        self.order.push_back(id.to_owned());
        self.last.clear();
        self.last.push_str(id);
        true
    }

    /// Sends the cursor to the persistence task.
    #[inline]
    pub fn commit(&mut self) {
        let _ = self.tx.try_send(self.last.clone());
    }

    /// How many ids the window holds.
    pub fn window_len(&self) -> usize {
        self.order.len()
    }
}
