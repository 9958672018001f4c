use super::*;
use crate::{EventTracker, FingerprintKey, Millis, StreamKey, TrackerConfig};
use proptest::prelude::*;
use std::collections::VecDeque;

fn event(id: u64) -> Event {
    Event {
        event: "message".into(),
        data: format!("d{id}"),
        id: Some(id.to_string()),
        last_event_id: id.to_string(),
    }
}

fn tracker() -> EventTracker {
    EventTracker::new(
        StreamKey::new("s", "shared"),
        TrackerConfig {
            window: 64,
            max_age: None,
            fingerprint_key: FingerprintKey::new(1, 2),
        },
    )
}

/// Frames `ids` as a leader that delivered `after` last sends them.
fn chain(after: Option<u64>, ids: impl IntoIterator<Item = u64>) -> Vec<Frame> {
    let mut leader = Sequencer::new(after.map(|a| a.to_string()).as_deref(), WAIT, 16);
    ids.into_iter().map(|id| leader.frame(event(id))).collect()
}

const WAIT: Millis = Millis(1000);

/// Offers `frames` at `now`; the ids delivered.
fn offer(s: &mut Sequencer, t: &mut EventTracker, now: u64, frames: Vec<Frame>) -> Vec<u64> {
    let mut out = Vec::new();
    for frame in frames {
        s.offer(frame, t, Millis(now), &mut out);
    }
    ids(out)
}

fn ids(frames: Vec<Frame>) -> Vec<u64> {
    frames
        .into_iter()
        .map(|f| f.event.id.unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_leader_chains_its_frames() {
    let frames = chain(Some(4), [5, 6]);
    assert_eq!(frames[0].prev, "4");
    assert_eq!(frames[1].prev, "5");
    assert_eq!(chain(None, [1])[0].prev, "");
}

#[test]
fn recent_is_bounded_by_count_and_bytes_and_keeps_the_newest() {
    let mut recent = Recent::new(3, usize::MAX);
    chain(None, 1..=5).into_iter().for_each(|f| recent.push(f));
    assert_eq!(recent.len(), 3);
    assert_eq!(recent.catch_up(Some("2")), None);
    assert_eq!(ids(recent.catch_up(Some("3")).unwrap()), [4, 5]);
    assert_eq!(recent.catch_up(Some("5")), Some(vec![]));
    assert_eq!(recent.catch_up(None), None);
    assert_eq!(recent.catch_up(Some("")), None);
    assert_eq!(recent.catch_up(Some("x")), None);

    let mut tiny = Recent::new(100, 10);
    chain(None, 1..=2).into_iter().for_each(|f| tiny.push(f));
    assert_eq!(tiny.len(), 1, "over the byte bound only the newest stays");
    assert!(!tiny.is_empty());
}

#[test]
fn a_joiner_delivers_the_catch_up_then_what_it_held() {
    let mut t = tracker();
    t.seed_last_event_id("2", Millis(0));
    let mut s = Sequencer::new(Some("2"), WAIT, 16);
    // Live frames 5 and 6 come before the answer: held.
    assert_eq!(
        offer(&mut s, &mut t, 0, chain(Some(4), [5, 6])),
        [] as [u64; 0]
    );
    assert_eq!(s.held(), 2);
    assert_eq!(s.deadline(), Some(WAIT));
    // The answer: 3 to 5.
    assert_eq!(
        offer(&mut s, &mut t, 5, chain(Some(2), 3..=5)),
        [3, 4, 5, 6]
    );
    assert_eq!(s.held(), 0);
    assert_eq!(s.last(), Some("6"));
}

#[test]
fn a_replay_from_before_the_position_is_dropped_once_overdue() {
    let mut t = tracker();
    let mut s = Sequencer::new(None, WAIT, 16);
    assert_eq!(offer(&mut s, &mut t, 0, chain(None, 1..=3)), [1, 2, 3]);
    // A new leader that resumes from 1: 2 and 3 are seen, 4 follows.
    assert_eq!(offer(&mut s, &mut t, 10, chain(Some(1), 2..=4)), [4]);
    // A consumer seeded at 7 gets a leader's replay from 5 on.
    let mut t = tracker();
    t.seed_last_event_id("7", Millis(0));
    let mut s = Sequencer::new(Some("7"), WAIT, 16);
    assert_eq!(offer(&mut s, &mut t, 0, chain(Some(5), 6..=9)), [8, 9]);
    assert_eq!(s.held(), 1, "6 waits");
    let mut out = Vec::new();
    s.expire(&mut t, Millis(999), &mut out);
    assert_eq!(s.held(), 1);
    s.expire(&mut t, Millis(1000), &mut out);
    assert!(out.is_empty(), "6 came from before the position: dropped");
    assert_eq!(s.held(), 0);
}

#[test]
fn frames_out_of_turn_wait_for_the_chain() {
    let mut t = tracker();
    let mut s = Sequencer::new(Some("2"), WAIT, 16);
    // The new leader's 5 overtakes the old leader's 3 and 4.
    assert_eq!(
        offer(&mut s, &mut t, 0, chain(Some(4), [5])),
        [] as [u64; 0]
    );
    assert_eq!(offer(&mut s, &mut t, 1, chain(Some(2), [3, 4])), [3, 4, 5]);
}

#[test]
fn a_gap_is_taken_once_overdue_and_discarded_by_a_new_leader() {
    let mut t = tracker();
    let mut s = Sequencer::new(Some("2"), WAIT, 16);
    assert_eq!(
        offer(&mut s, &mut t, 0, chain(Some(5), [6, 7])),
        [] as [u64; 0]
    );
    // Nothing moved while they waited: a gap, delivered in order.
    assert_eq!(offer(&mut s, &mut t, 1000, chain(Some(7), [8])), [6, 7, 8]);
    // A consumer that leads from now on forgets what waits: its own
    // connection brings everything after its last event.
    let mut s = Sequencer::new(Some("2"), WAIT, 16);
    let mut t = tracker();
    assert_eq!(
        offer(&mut s, &mut t, 0, chain(Some(5), [6, 7])),
        [] as [u64; 0]
    );
    s.discard();
    assert_eq!(s.held(), 0);
    assert_eq!(s.deadline(), None);
    assert_eq!(offer(&mut s, &mut t, 1, chain(Some(2), [3])), [3]);
    // Too many held: the oldest is settled at once.
    let mut s = Sequencer::new(Some("2"), WAIT, 2);
    let mut t = tracker();
    assert_eq!(
        offer(&mut s, &mut t, 0, chain(Some(5), [6, 7, 8])),
        [6, 7, 8]
    );
}

// ---------------------------------------------------------------------------
// The rules, simulated: consumers exchanging messages through per-receiver
// FIFO queues (as a BroadcastChannel delivers them), leaders that crash at
// any point, followers promoted at any point, consumers joining late with a
// stored cursor that lags or with the position a reloaded page had, joins
// answered late or never, and time passing.

#[derive(Clone, Debug)]
enum Msg {
    Frames(Vec<Frame>),
    Join {
        from: usize,
        after: Option<String>,
    },
    CatchUp {
        to: usize,
        after: Option<String>,
        frames: Option<Vec<Frame>>,
    },
}

struct Consumer {
    tracker: EventTracker,
    sequencer: Sequencer,
    recent: Recent,
    /// The next event id of its connection, when leading.
    leading: Option<u64>,
    queue: VecDeque<Msg>,
    delivered: Vec<u64>,
    alive: bool,
    /// Whether it was there before the first event.
    from_start: bool,
    /// The cursor it started from.
    seed: Option<u64>,
    /// The newest event any consumer had delivered when it joined.
    joined_at: u64,
}

impl Consumer {
    fn new(cursor: Option<u64>, from_start: bool) -> Self {
        let mut tracker = tracker();
        let seed = cursor.map(|id| id.to_string());
        if let Some(id) = &seed {
            tracker.seed_last_event_id(id, Millis(0));
        }
        Consumer {
            tracker,
            // Bounds the runs never reach: the bounds have tests of their
            // own above.
            sequencer: Sequencer::new(seed.as_deref(), WAIT, 4096),
            recent: Recent::new(4096, usize::MAX),
            leading: None,
            queue: VecDeque::new(),
            delivered: Vec::new(),
            alive: true,
            from_start,
            seed: cursor,
            joined_at: 0,
        }
    }

    fn take(&mut self, out: Vec<Frame>) {
        for frame in out {
            self.delivered
                .push(frame.event.id.as_deref().unwrap().parse().unwrap());
            self.recent.push(frame);
        }
    }

    fn offer(&mut self, frames: Vec<Frame>, now: Millis) {
        let mut out = Vec::new();
        for frame in frames {
            self.sequencer
                .offer(frame, &mut self.tracker, now, &mut out);
        }
        self.take(out);
    }

    fn expire(&mut self, now: Millis) {
        let mut out = Vec::new();
        self.sequencer.expire(&mut self.tracker, now, &mut out);
        self.take(out);
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// The server has this many more events.
    Produce(u64),
    /// The leader reads up to this many events and sends them.
    Read(u64),
    /// A consumer handles its next message.
    Handle(usize),
    /// The leader crashes.
    Crash,
    /// A consumer takes the free lock.
    Promote(usize),
    /// The leader writes its cursor.
    Flush,
    /// A consumer joins with the stored cursor.
    JoinStored,
    /// A consumer joins with the position of a page that had this many
    /// fewer events than the newest delivered (a reload).
    JoinAt(u64),
    /// Time passes.
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..6u64).prop_map(Op::Produce),
        3 => (1..5u64).prop_map(Op::Read),
        8 => (0..8usize).prop_map(Op::Handle),
        1 => Just(Op::Crash),
        2 => (0..8usize).prop_map(Op::Promote),
        2 => Just(Op::Flush),
        1 => Just(Op::JoinStored),
        1 => (0..12u64).prop_map(Op::JoinAt),
        2 => (0..700u64).prop_map(Op::Tick),
    ]
}

struct World {
    consumers: Vec<Consumer>,
    produced: u64,
    /// The stored cursor.
    stored: Option<u64>,
    now: Millis,
}

impl World {
    /// Three consumers before the first event; the first leads.
    fn new() -> Self {
        let mut world = World {
            consumers: (0..3).map(|_| Consumer::new(None, true)).collect(),
            produced: 0,
            stored: None,
            now: Millis(0),
        };
        world.promote(0);
        world
    }

    fn leader(&self) -> Option<usize> {
        self.consumers
            .iter()
            .position(|c| c.alive && c.leading.is_some())
    }

    fn send(&mut self, from: usize, msg: &Msg) {
        for (i, c) in self.consumers.iter_mut().enumerate() {
            if i != from && c.alive {
                c.queue.push_back(msg.clone());
            }
        }
    }

    fn alive(&self, i: usize) -> Option<usize> {
        let alive: Vec<usize> = (0..self.consumers.len())
            .filter(|&i| self.consumers[i].alive)
            .collect();
        (!alive.is_empty()).then(|| alive[i % alive.len()])
    }

    fn promote(&mut self, i: usize) {
        if self.leader().is_some() {
            return;
        }
        let Some(i) = self.alive(i) else { return };
        let now = self.now;
        let stored = self.stored;
        let c = &mut self.consumers[i];
        // First the frames already received, as a follower; joins are
        // answered once leading.
        let mut joins = Vec::new();
        while let Some(msg) = c.queue.pop_front() {
            match msg {
                Msg::Frames(frames) => c.offer(frames, now),
                join @ Msg::Join { .. } => joins.push(join),
                Msg::CatchUp { .. } => {}
            }
        }
        c.sequencer.discard();
        // Then resume from its own last id (the stored cursor if it has
        // none): the server sends what follows.
        let from = c
            .sequencer
            .last()
            .map(|id| id.parse::<u64>().unwrap())
            .or(stored);
        if let (None, Some(stored)) = (c.sequencer.last(), stored) {
            c.tracker.seed_last_event_id(&stored.to_string(), now);
            c.sequencer = Sequencer::new(Some(&stored.to_string()), WAIT, 4096);
        }
        c.leading = Some(from.map_or(1, |id| id + 1));
        c.queue.extend(joins);
    }

    fn read(&mut self, k: u64) {
        let Some(l) = self.leader() else { return };
        let (produced, now) = (self.produced, self.now);
        let c = &mut self.consumers[l];
        let mut frames = Vec::new();
        while c.leading.unwrap() <= produced && frames.len() < k as usize {
            let id = c.leading.unwrap();
            c.leading = Some(id + 1);
            // The stream's tracker drops what this consumer already has.
            if c.tracker.observe(Some(&id.to_string()), now).is_fresh() {
                let frame = c.sequencer.frame(event(id));
                c.delivered.push(id);
                c.recent.push(frame.clone());
                frames.push(frame);
            }
        }
        if !frames.is_empty() {
            self.send(l, &Msg::Frames(frames));
        }
    }

    fn handle(&mut self, i: usize) {
        let now = self.now;
        let Some(msg) = self.consumers[i].queue.pop_front() else {
            return;
        };
        let c = &mut self.consumers[i];
        match (msg, c.leading.is_some()) {
            (Msg::Join { from, after }, true) => {
                let frames = c.recent.catch_up(after.as_deref());
                self.send(
                    i,
                    &Msg::CatchUp {
                        to: from,
                        after,
                        frames,
                    },
                );
            }
            // A leader ignores frames still in flight from an earlier one
            // (the server sends those events again), and every answer.
            (_, true) | (Msg::Join { .. }, false) => {}
            (Msg::Frames(frames), false) => c.offer(frames, now),
            (Msg::CatchUp { to, after, frames }, false) if to == i => {
                let mut out = Vec::new();
                let after = after.as_deref();
                c.sequencer
                    .answer(after, frames, &mut c.tracker, now, &mut out);
                c.take(out);
            }
            (Msg::CatchUp { .. }, false) => {}
        }
        self.ask_if_waiting(i);
    }

    /// Asks the leader for what follows when frames start to wait.
    fn ask_if_waiting(&mut self, i: usize) {
        let c = &mut self.consumers[i];
        if c.leading.is_none() && c.sequencer.should_ask(self.now) {
            let after = c.sequencer.last().map(str::to_owned);
            self.send(i, &Msg::Join { from: i, after });
        }
    }

    /// The newest event delivered anywhere.
    fn newest(&self) -> Option<u64> {
        self.consumers
            .iter()
            .filter_map(|c| c.delivered.last().copied())
            .max()
    }

    fn join(&mut self, seed: Option<u64>) {
        if self.consumers.len() >= 8 {
            return;
        }
        let mut c = Consumer::new(seed.filter(|&id| id > 0), false);
        c.joined_at = self.newest().unwrap_or(0);
        c.sequencer.asked(self.now);
        let after = c.sequencer.last().map(str::to_owned);
        self.consumers.push(c);
        let from = self.consumers.len() - 1;
        self.send(from, &Msg::Join { from, after });
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Produce(k) => self.produced += k,
            Op::Read(k) => self.read(k),
            Op::Handle(i) => {
                if let Some(i) = self.alive(i) {
                    self.handle(i);
                }
            }
            Op::Crash => {
                if let Some(l) = self.leader() {
                    let c = &mut self.consumers[l];
                    c.alive = false;
                    c.queue.clear();
                }
            }
            Op::Promote(i) => self.promote(i),
            Op::Flush => {
                if let Some(l) = self.leader() {
                    let last = self.consumers[l].sequencer.last();
                    self.stored = last.map(|id| id.parse().unwrap()).or(self.stored);
                }
            }
            Op::JoinStored => self.join(self.stored),
            Op::JoinAt(behind) => self.join(self.newest().and_then(|n| n.checked_sub(behind))),
            Op::Tick(ms) => {
                self.now = self.now + Millis(ms);
                let now = self.now;
                for i in 0..self.consumers.len() {
                    if self.consumers[i].alive {
                        self.consumers[i].expire(now);
                        self.ask_if_waiting(i);
                    }
                }
            }
        }
    }

    /// Runs until every consumer alive has handled everything, with a
    /// leader that read the whole stream and nothing held.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            self.promote(0);
            self.read(u64::MAX);
            let busy: Vec<usize> = (0..self.consumers.len())
                .filter(|&i| self.consumers[i].alive && !self.consumers[i].queue.is_empty())
                .collect();
            if busy.is_empty() {
                let held = self
                    .consumers
                    .iter()
                    .any(|c| c.alive && c.sequencer.held() > 0);
                if !held {
                    return;
                }
                self.apply(Op::Tick(WAIT.0));
            }
            for i in busy {
                self.handle(i);
            }
        }
        panic!("the simulation did not settle");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every consumer open from the start delivers the whole stream, each
    /// event once, in order; every consumer that joined later delivers no
    /// event twice, and not the one its cursor named. (When leadership
    /// passes to a late joiner that is behind another late joiner, and it
    /// takes longer than the wait to replay up to that one's position, the
    /// other may take its frames for a gap: events from before its cursor,
    /// or a hole. The next property shows that leaders which replay
    /// promptly, as a server's backlog comes, keep joiners exact too.)
    #[test]
    fn every_open_consumer_gets_each_event_once(ops in prop::collection::vec(op(), 0..200)) {
        let mut world = World::new();
        for op in ops {
            world.apply(op);
        }
        world.settle();
        for (i, c) in world.consumers.iter().enumerate().filter(|(_, c)| c.alive) {
            if c.from_start {
                let expected: Vec<u64> = (1..=world.produced).collect();
                prop_assert_eq!(&c.delivered, &expected, "consumer {}", i);
                continue;
            }
            let mut seen = std::collections::HashSet::new();
            for id in &c.delivered {
                prop_assert!(seen.insert(*id), "consumer {} delivered {} twice: {:?}", i, id, c.delivered);
                prop_assert!(Some(*id) != c.seed, "consumer {} delivered its cursor {}", i, id);
            }
        }
    }

    /// Joiners whose leaders read promptly (every leader reads the whole
    /// stream as soon as it has the lock, and no time passes): each event
    /// once, in order, with no gap after the first, up to the newest.
    #[test]
    fn joiners_of_prompt_leaders_get_each_event_once_in_order(ops in prop::collection::vec(op(), 0..200)) {
        let mut world = World::new();
        for op in ops {
            if matches!(op, Op::Tick(_)) {
                continue;
            }
            world.apply(op);
            world.read(u64::MAX);
        }
        world.settle();
        for (i, c) in world.consumers.iter().enumerate().filter(|(_, c)| c.alive) {
            if let Some(&first) = c.delivered.first() {
                let expected: Vec<u64> = (first..=world.produced).collect();
                prop_assert_eq!(&c.delivered, &expected, "consumer {}", i);
            } else {
                let had = c.seed.unwrap_or(0).max(c.joined_at);
                prop_assert!(world.produced <= had, "consumer {} got nothing of {}", i, world.produced);
            }
        }
    }
}
