use super::*;
use crate::fingerprint::FingerprintKey;
use crate::window::DedupWindow;
use proptest::prelude::*;

fn span(reset: bool, epoch: u64, end: u64, entries: Vec<Entry>, times: Vec<Millis>) -> Span {
    let mut span = Span::new(reset, 1024, epoch, end);
    for (k, entry) in entries.into_iter().enumerate() {
        span.push(entry, times.get(k).copied());
    }
    span
}

fn round_trip(span: &Span) -> Span {
    let mut bytes = Vec::new();
    span.encode(&mut bytes);
    let mut input = &bytes[..];
    let decoded = Span::decode(&mut input).unwrap();
    assert!(input.is_empty(), "the record is read whole");
    decoded
}

#[test]
fn consecutive_numbers_cost_a_byte_each_and_fingerprints_eight() {
    let numbers: Vec<Entry> = (1_000_000..1_001_000).map(Entry::Number).collect();
    let s = span(false, 0, 1_000, numbers, Vec::new());
    let mut bytes = Vec::new();
    s.encode(&mut bytes);
    // 1000 one-byte deltas, the first from zero (3 bytes), a header.
    assert!(bytes.len() < 1_015, "{}", bytes.len());
    assert_eq!(round_trip(&s), s);

    let fps: Vec<Entry> = (0..100u64)
        .map(|n| Entry::Fingerprint(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();
    let s = span(true, 3, 100, fps, Vec::new());
    let mut bytes = Vec::new();
    s.encode(&mut bytes);
    assert!((800..815).contains(&bytes.len()), "{}", bytes.len());
    assert_eq!(round_trip(&s), s);
}

#[test]
fn decoding_rejects_what_it_cannot_read() {
    let s = span(
        false,
        1,
        3,
        vec![Entry::Number(7), Entry::Fingerprint(9), Entry::Number(3)],
        vec![Millis(5), Millis(6), Millis(6)],
    );
    let mut bytes = Vec::new();
    s.encode(&mut bytes);
    for cut in 0..bytes.len() {
        assert!(
            SavedWindow::decode(&bytes[..cut]).is_err() || cut == 0,
            "cut at {cut}"
        );
    }
    assert_eq!(SavedWindow::decode(&[]).unwrap(), SavedWindow::new());
    let mut flags = bytes.clone();
    flags[0] |= 0x80;
    assert!(SavedWindow::decode(&flags).unwrap_err().contains("flags"));
    // cap 0
    assert!(
        SavedWindow::decode(&[1, 0, 0, 0, 0])
            .unwrap_err()
            .contains("bound")
    );
    // 70,000 entries
    assert!(
        SavedWindow::decode(&[1, 1, 0, 0, 0, 0xf0, 0xa2, 0x04])
            .unwrap_err()
            .contains("more than")
    );
    // a varint that never ends
    assert!(SavedWindow::decode(&[1; 12]).is_err());
}

#[test]
fn changes_apply_once_in_order_and_resets_replace() {
    let n = |v: u64| Entry::Number(v);
    let mut saved = SavedWindow::new();
    saved
        .span
        .apply(&span(false, 0, 2, vec![n(1), n(2)], Vec::new()));
    // An overlapping change adds only what is new; a repeated one nothing.
    saved
        .span
        .apply(&span(false, 0, 4, vec![n(2), n(3), n(4)], Vec::new()));
    saved
        .span
        .apply(&span(false, 0, 4, vec![n(3), n(4)], Vec::new()));
    assert_eq!(saved.span.entries(), [n(1), n(2), n(3), n(4)]);
    // An older epoch is stale; a newer one replaces.
    saved.span.apply(&span(true, 0, 3, vec![n(9)], Vec::new()));
    assert_eq!(saved.len(), 4);
    saved.span.apply(&span(true, 1, 5, vec![n(5)], Vec::new()));
    saved.span.apply(&span(false, 0, 9, vec![n(6)], Vec::new()));
    assert_eq!(saved.span.entries(), [n(5)]);
    assert_eq!((saved.span.epoch, saved.span.end), (1, 5));
    // Trimmed to the newest `cap`.
    let mut small = span(false, 1, 8, vec![n(6), n(7), n(8)], Vec::new());
    small.cap = 2;
    saved.span.apply(&small);
    assert_eq!(saved.span.entries(), [n(7), n(8)]);
    assert!(saved.span.reset);
}

#[test]
fn times_follow_their_entries() {
    let n = |v: u64| Entry::Number(v);
    let mut saved = SavedWindow::new();
    saved.span.apply(&span(false, 0, 1, vec![n(1)], Vec::new()));
    saved
        .span
        .apply(&span(false, 0, 2, vec![n(2)], vec![Millis(50)]));
    assert_eq!(saved.span.times(), [Millis::ZERO, Millis(50)]);
    let decoded = SavedWindow::decode(&saved.to_bytes()).unwrap();
    assert_eq!(decoded, saved);
    saved.span.apply(&span(false, 0, 3, vec![n(3)], Vec::new()));
    assert!(saved.span.times().is_empty());
}

/// One step of a window's life in the model below.
#[derive(Clone, Debug)]
enum Op {
    /// An id of a small universe of numbers (increasing or not) and strings.
    Id(u16),
    /// The next id of an increasing counter.
    Next,
    /// The tracker commits: the window's new entries go to the slot.
    Commit,
    /// The worker writes what the slot has (or the write fails).
    Write { fails: bool },
    /// The window is cleared (an empty id, or a restart at a position).
    Clear,
    /// Time passes.
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u16..300).prop_map(Op::Id),
        6 => Just(Op::Next),
        4 => Just(Op::Commit),
        2 => any::<bool>().prop_map(|fails| Op::Write { fails }),
        1 => Just(Op::Clear),
        1 => (0u64..80).prop_map(Op::Wait),
    ]
}

fn universe(n: u16) -> String {
    match n % 5 {
        0 => format!("id-{}", n / 5),
        1 => format!("0{}", n / 5),
        _ => (n * 3).to_string(),
    }
}

proptest! {
    /// A window saved through commits, writes (some failing, with their
    /// changes kept and written again) and the byte encoding, then loaded,
    /// classifies every id as the window that was saved does, and goes on
    /// doing so as both see the same ids.
    #[test]
    fn a_saved_window_classifies_like_the_window_that_was_saved(
        cap in 1usize..48,
        max_age in prop::option::of(1u64..200),
        ops in prop::collection::vec(op(), 0..400),
        append_log in any::<bool>(),
        later in prop::collection::vec(0u16..300, 0..60),
    ) {
        let key = FingerprintKey::new(3, 4);
        let max_age = max_age.map(Millis);
        let mut window = DedupWindow::new(cap, max_age, key);
        // As a slot does: the change not yet written ends where the window
        // stood at the last commit.
        let mut pending = Some(Box::new(Span::new(false, cap, 0, 0)));
        // What the store holds: records appended, or the fold rewritten.
        let mut stored: Vec<u8> = Vec::new();
        let mut now = 0u64;
        let mut next = 1000u64;
        let write = |pending: &mut Option<Box<Span>>, stored: &mut Vec<u8>| {
            if let Some(change) = pending.clone().filter(|c| c.reset || c.len() > 0) {
                if append_log {
                    change.encode(stored);
                } else {
                    let mut saved = SavedWindow::decode(stored).unwrap();
                    saved.span.apply(&change);
                    *stored = saved.to_bytes();
                }
                let p = pending.as_mut().unwrap();
                p.confirm(change.epoch, change.end);

            }
        };
        for op in ops {
            match op {
                Op::Id(n) => {
                    let id = universe(n);
                    window.expire(Millis(now));
                    let _ = window.insert(id.as_bytes(), Millis(now));
                }
                Op::Next => {
                    next += 1 + next % 2;
                    window.expire(Millis(now));
                    let _ = window.insert(next.to_string().as_bytes(), Millis(now));
                }
                Op::Commit => {
                    window.export(&mut pending);
                }
                Op::Write { fails } => {
                    if !fails {
                        write(&mut pending, &mut stored);
                    }
                }
                Op::Clear => {
                    window.clear();
                }
                Op::Wait(ms) => now += ms,
            }
        }
        // A graceful stop: commit, then write everything.
        window.export(&mut pending);
        write(&mut pending, &mut stored);
        prop_assert!(pending.as_ref().is_none_or(|p| !p.reset && p.len() == 0));

        let saved = SavedWindow::decode(&stored).unwrap();
        let mut loaded = DedupWindow::new(cap, max_age, key);
        loaded.restore(&saved.span);
        prop_assert_eq!(loaded.marks(), window.marks());
        window.expire(Millis(now));
        loaded.expire(Millis(now));
        prop_assert_eq!(loaded.len(), window.len());
        let mut probe: Vec<String> = (0..300).map(universe).collect();
        probe.extend((1000..=next + 1).map(|n| n.to_string()));
        for id in &probe {
            prop_assert_eq!(loaded.contains(id.as_bytes()), window.contains(id.as_bytes()), "{}", id);
        }
        for n in later {
            let id = universe(n);
            now += 7;
            window.expire(Millis(now));
            loaded.expire(Millis(now));
            prop_assert_eq!(
                loaded.insert(id.as_bytes(), Millis(now)),
                window.insert(id.as_bytes(), Millis(now)),
                "{}", id
            );
        }
    }
}

mod registry {
    use crate::clock::{Clock, ManualClock, Millis};
    use crate::cursor::StreamKey;
    use crate::flaky::{FlakyConfig, FlakyStore};
    use crate::registry::{Config, Registry, persistence};
    use crate::store::MemStore;
    use crate::tracker::{EventTracker, TrackerConfig};
    use futures::executor::LocalPool;
    use futures::task::LocalSpawnExt;
    use std::rc::Rc;

    type Flaky = Rc<FlakyStore<Rc<MemStore>, ManualClock>>;

    /// One process: a registry over the shared store, its worker running.
    struct Process {
        pool: LocalPool,
        clock: ManualClock,
        store: Flaky,
        registry: Registry<Flaky>,
    }

    fn start(mem: &Rc<MemStore>, clock: &ManualClock) -> Process {
        let store = Rc::new(FlakyStore::new(
            mem.clone(),
            clock.clone(),
            FlakyConfig::default(),
        ));
        let (registry, worker) = persistence(store.clone(), clock.clone(), Config::default());
        let pool = LocalPool::new();
        pool.spawner()
            .spawn_local(async move {
                worker.run().await;
            })
            .unwrap();
        Process {
            pool,
            clock: clock.clone(),
            store,
            registry,
        }
    }

    impl Process {
        fn open(&mut self) -> EventTracker {
            self.pool
                .run_until(self.registry.open(StreamKey::new("s", "a")))
                .unwrap()
        }

        /// Feeds ids as a server sends them; returns those delivered.
        fn feed(&mut self, tracker: &mut EventTracker, ids: &[String]) -> Vec<String> {
            let mut delivered = Vec::new();
            for id in ids {
                if tracker.observe(Some(id), self.clock.now()).is_fresh() {
                    delivered.push(id.clone());
                    tracker.commit();
                }
                self.clock.advance(Millis(3));
                self.pool.run_until_stalled();
            }
            delivered
        }

        fn stop(mut self) {
            let deadline = self.clock.now() + Millis(1000);
            let report = self
                .pool
                .run_until(self.registry.shutdown(deadline))
                .unwrap();
            assert!(report.is_complete());
        }
    }

    fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
        range.map(|n| n.to_string()).collect()
    }

    /// What a server that re-sends 30 events before `Last-Event-ID` sends.
    fn rewound(tracker: &EventTracker, to: u64) -> Vec<String> {
        let last: u64 = tracker.last_event_id().unwrap().parse().unwrap();
        ids(last.saturating_sub(29)..=to)
    }

    #[test]
    fn a_graceful_restart_keeps_the_window_so_a_rewinding_server_repeats_nothing() {
        let mem = Rc::new(MemStore::new());
        let clock = ManualClock::new();
        let mut delivered = Vec::new();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        delivered.extend(p.feed(&mut t, &ids(1..=200)));
        drop(t);
        p.stop();
        for round in 1..=5u64 {
            let mut p = start(&mem, &clock);
            let mut t = p.open();
            let replay = rewound(&t, 200 + round * 100);
            delivered.extend(p.feed(&mut t, &replay));
            drop(t);
            p.stop();
        }
        assert_eq!(delivered, ids(1..=700), "every id once, in order");
        // Each flush wrote only what changed: about one entry per event.
        assert!(
            mem.window_entries_written() < 760,
            "{}",
            mem.window_entries_written()
        );
    }

    #[test]
    fn uuid_ids_survive_too_under_the_stores_key() {
        let mem = Rc::new(MemStore::new());
        let clock = ManualClock::new();
        let uuid = |n: u64| format!("{n:08x}-4f1c-8a2e-b5d3-{:012x}", n * 7919);
        let all: Vec<String> = (0..300).map(uuid).collect();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(p.feed(&mut t, &all[..200]), &all[..200]);
        drop(t);
        p.stop();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(p.feed(&mut t, &all[150..]), &all[200..]);
        // A tracker made by hand has its own key and an empty window.
        let mut lone = EventTracker::new(StreamKey::new("s", "a"), TrackerConfig::default());
        assert!(lone.observe(Some(&all[10]), Millis(1)).is_fresh());
        drop(t);
        p.stop();
    }

    #[test]
    fn after_a_crash_only_what_arrived_since_the_last_flush_repeats() {
        let mem = Rc::new(MemStore::new());
        let clock = ManualClock::new();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        // 100 events, 3 ms apart: the last flush was at most 250 ms ago.
        assert_eq!(p.feed(&mut t, &ids(1..=100)).len(), 100);
        let flushed: u64 = mem
            .get(&StreamKey::new("s", "a"))
            .unwrap()
            .last_event_id
            .parse()
            .unwrap();
        assert!(flushed >= 100 - 84, "{flushed}");
        // The process dies: no shutdown, nothing more written.
        drop((t, p));
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        let replay = rewound(&t, 150);
        let again = p.feed(&mut t, &replay);
        assert_eq!(
            again,
            ids(flushed + 1..=150),
            "repeats only what was not flushed"
        );
        drop(t);
        p.stop();
    }

    #[test]
    fn a_reset_of_the_ids_is_kept_so_reused_ids_are_not_dropped() {
        let mem = Rc::new(MemStore::new());
        let clock = ManualClock::new();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(p.feed(&mut t, &ids(1..=50)).len(), 50);
        // An empty id: the server starts its ids again.
        assert!(t.observe(Some(""), clock.now()).is_fresh());
        t.commit();
        assert_eq!(p.feed(&mut t, &ids(1..=10)), ids(1..=10));
        drop(t);
        p.stop();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(t.last_event_id(), Some("10"));
        assert_eq!(p.feed(&mut t, &ids(1..=20)), ids(11..=20));
        drop(t);
        p.stop();
    }

    #[test]
    fn a_store_without_windows_still_resumes_from_its_cursor() {
        let mem = Rc::new(MemStore::without_windows());
        let clock = ManualClock::new();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(p.feed(&mut t, &ids(1..=40)).len(), 40);
        drop(t);
        p.stop();
        assert!(mem.window(&StreamKey::new("s", "a")).is_none());
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(t.last_event_id(), Some("40"));
        // Only the cursor's id is known: the rest of a rewind repeats.
        assert_eq!(
            p.feed(&mut t, &ids(35..=41)),
            ["35", "36", "37", "38", "39", "41"]
        );
        drop(t);
        p.stop();
    }

    /// The same data, through a store that keeps no windows (an older
    /// version, a store opened without them).
    struct CursorsOnly(Rc<MemStore>);

    impl crate::store::Store for CursorsOnly {
        async fn load(&self, key: &StreamKey) -> Result<Option<crate::Cursor>, crate::StoreError> {
            self.0.load(key).await
        }
        async fn save_batch(&self, cursors: &[crate::Cursor]) -> Result<(), crate::StoreError> {
            self.0.save_batch(cursors).await
        }
        async fn delete(&self, key: &StreamKey) -> Result<(), crate::StoreError> {
            self.0.delete(key).await
        }
    }

    #[test]
    fn a_window_left_behind_by_a_writer_without_windows_is_not_used() {
        let mem = Rc::new(MemStore::new());
        let clock = ManualClock::new();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(p.feed(&mut t, &ids(1..=50)).len(), 50);
        drop(t);
        p.stop();
        // A writer that keeps no window: the server resets its ids.
        {
            let store = Rc::new(CursorsOnly(mem.clone()));
            let (registry, worker) = persistence(store, clock.clone(), Config::default());
            let mut pool = LocalPool::new();
            pool.spawner()
                .spawn_local(async move {
                    worker.run().await;
                })
                .unwrap();
            let mut t = pool
                .run_until(registry.open(StreamKey::new("s", "a")))
                .unwrap();
            assert!(t.observe(Some(""), clock.now()).is_fresh());
            t.commit();
            for id in ids(1..=10) {
                assert!(t.observe(Some(&id), clock.now()).is_fresh());
                t.commit();
            }
            drop(t);
            let deadline = clock.now() + Millis(1000);
            assert!(
                pool.run_until(registry.shutdown(deadline))
                    .unwrap()
                    .is_complete()
            );
        }
        // The window of before the reset would drop 11..=20 as replays.
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(t.last_event_id(), Some("10"));
        let delivered = p.feed(&mut t, &ids(1..=20));
        assert!(delivered.ends_with(&ids(11..=20)), "{delivered:?}");
        // From now on the window is kept again.
        drop(t);
        p.stop();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert!(p.feed(&mut t, &ids(1..=20)).is_empty());
        drop(t);
        p.stop();
    }

    #[test]
    fn failed_writes_keep_the_window_change_until_one_succeeds() {
        let mem = Rc::new(MemStore::new());
        let clock = ManualClock::new();
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert_eq!(p.feed(&mut t, &ids(1..=10)).len(), 10);
        p.store.set_down(true);
        assert_eq!(p.feed(&mut t, &ids(11..=300)).len(), 290);
        clock.advance(Millis(2000));
        p.pool.run_until_stalled();
        p.store.set_down(false);
        drop(t);
        p.stop();
        let window = mem.window(&StreamKey::new("s", "a")).unwrap();
        assert_eq!(window.len(), 300);
        let mut p = start(&mem, &clock);
        let mut t = p.open();
        assert!(p.feed(&mut t, &ids(1..=300)).is_empty());
        drop(t);
        p.stop();
    }
}
