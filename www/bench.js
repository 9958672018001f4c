// Benchmarks of the tidemark package against baselines in the same page:
// 1. observe() and, for a fresh id, commit() through the wasm API against a
//    pure-JS tracker (a Set and an array ring of the last 1024 ids), per
//    event; also batched (observeMany, then one commit()).
// 2. sustained events/s with persistence in IndexedDB against a naive
//    baseline that writes each event id with idb-keyval; and IndexedDB
//    transactions per second at two event rates.
// 3. a live stream: ResumableEventSource against the browser's own
//    EventSource on the same `/events` of `tidemark serve --interval-ms 0`,
//    events/s to the page's `message` listener.
// Results land in `globalThis.benchResults` and on the page.
import { openTracker, initialize, ResumableEventSource } from 'tidemark';
import { set as idbSet, createStore } from 'idb-keyval';

const WINDOW = 1024;

/** The baseline a careful app would write by hand. */
class JsTracker {
  constructor(size = WINDOW) {
    this.size = size;
    this.seen = new Set();
    this.ring = new Array(size);
    this.head = 0;
    this.count = 0;
    this.lastEventId = undefined;
  }
  observe(id) {
    if (id == null) return true;
    if (this.seen.has(id)) return false;
    if (this.count === this.size) this.seen.delete(this.ring[this.head]);
    else this.count++;
    this.ring[this.head] = id;
    this.head = (this.head + 1) % this.size;
    this.seen.add(id);
    this.lastEventId = id;
    return true;
  }
}

/** The id numbers of `n` events: increasing, every 10th event a replay of one 5 back. */
function idNumbers(n) {
  const out = [];
  for (let i = 1; out.length < n; i++) {
    out.push(i);
    if (i % 10 === 0) out.push(i - 5);
  }
  return out;
}

/**
 * The id strings of `numbers`, `shape` 'numeric' ("1", "2", ...) or 'uuid'
 * (36 characters, like most MCP servers' ids), made new on every call the
 * way an SSE parser makes them, by splitting decoded text. New strings
 * matter: a Set caches a string's hash inside it, so strings shared between
 * contenders would favour whichever runs second.
 */
function idStrings(numbers, shape, salt) {
  const hex = (x, w) => (x >>> 0).toString(16).padStart(w, '0').slice(-w);
  const make =
    shape === 'numeric'
      ? (i) => `${i}`
      : (i) => `${hex(salt, 8)}-${hex(i >>> 16, 4)}-4${hex(i, 3)}-8${hex(i * 7, 3)}-${hex(i * 2654435761, 8)}${hex(i, 4)}`;
  return numbers.map(make).join('\n').split('\n');
}

const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const yieldToLoop = () => new Promise((r) => setTimeout(r, 0));

/**
 * Per-event cost of observe: tidemark through the wasm API (observe and,
 * when fresh, commit per id; and batched: observeMany of 256 ids, then one
 * commit) against the pure-JS tracker, which has no commit step. Ids are made
 * chunk by chunk (4096 at a time, untimed) right before each contender
 * reads them, so they are as fresh and as warm in the cache as ids a parser
 * just produced; every contender gets its own copy. A second JS figure reads
 * ids whose hashes a Set already computed: the best case for JavaScript.
 */
async function observeBench(shape) {
  const n = 200_000;
  const chunk = 4096;
  const rounds = 15;
  // One salt per round: the UUID ids of a round are new to every tracker.
  const numbers = idNumbers(n);
  let key = 0;
  const open = () => openTracker(`bench-observe-${shape}-${key++}`, { store: 'memory' });
  const times = { js: [], jsHashed: [], wasm: [], wasmBatched: [] };
  for (let r = -1; r < rounds; r++) {
    // Round -1 warms both sides up (JIT, wasm tiering) and is not counted.
    const single = await open();
    const batched = await open();
    const js = new JsTracker();
    const hashed = new JsTracker();
    const spent = { js: 0, jsHashed: 0, wasm: 0, wasmBatched: 0 };
    const fresh = { js: 0, jsHashed: 0, wasm: 0, wasmBatched: 0 };
    for (let c = 0; c < n; c += chunk) {
      const part = numbers.slice(c, c + chunk);
      let input = idStrings(part, shape, r + 2);
      let t0 = performance.now();
      for (const id of input) if (js.observe(id)) fresh.js++;
      spent.js += performance.now() - t0;

      input = idStrings(part, shape, r + 2);
      new Set(input);
      t0 = performance.now();
      for (const id of input) if (hashed.observe(id)) fresh.jsHashed++;
      spent.jsHashed += performance.now() - t0;

      input = idStrings(part, shape, r + 2);
      t0 = performance.now();
      for (const id of input) {
        if (single.observe(id)) {
          fresh.wasm++;
          single.commit();
        }
      }
      spent.wasm += performance.now() - t0;

      input = idStrings(part, shape, r + 2);
      t0 = performance.now();
      for (let i = 0; i < input.length; i += 256) {
        for (const f of batched.observeMany(input.slice(i, i + 256))) if (f) fresh.wasmBatched++;
        batched.commit();
      }
      spent.wasmBatched += performance.now() - t0;
    }
    const counts = Object.values(fresh);
    if (counts.some((x) => x !== counts[0])) throw new Error(`trackers disagree: ${JSON.stringify(fresh)}`);
    await single.close();
    await batched.close();
    if (r >= 0) for (const k of Object.keys(times)) times[k].push((spent[k] * 1e6) / n);
    await yieldToLoop();
  }
  const js = median(times.js);
  const jsHashed = median(times.jsHashed);
  const wasm = median(times.wasm);
  const wasmBatched = median(times.wasmBatched);
  return {
    shape,
    events: n,
    rounds,
    jsNsPerEvent: js,
    jsHashedNsPerEvent: jsHashed,
    wasmNsPerEvent: wasm,
    wasmBatchedNsPerEvent: wasmBatched,
    wasmOverJs: wasm / js,
    wasmBatchedOverJs: wasmBatched / js,
    wasmOverJsHashed: wasm / jsHashed,
    wasmBatchedOverJsHashed: wasmBatched / jsHashed,
  };
}

/**
 * Feeds events to `handle` for `seconds`, `perTask` events per task with
 * `gapMs` between tasks (0: as fast as the page can), and returns how many
 * it fed and how long it took.
 */
async function feedFor(seconds, perTask, gapMs, handle) {
  const t0 = performance.now();
  const until = t0 + seconds * 1000;
  let id = 0;
  while (performance.now() < until) {
    for (const end = id + perTask; id < end; ) {
      const pending = handle(String(++id));
      if (pending) await pending;
    }
    await new Promise((r) => setTimeout(r, gapMs));
  }
  const elapsed = (performance.now() - t0) / 1000;
  return { events: id, seconds: elapsed, eventsPerSecond: id / elapsed };
}

/**
 * tidemark's observe() and commit() with its IndexedDB writer, flat out and at ~500
 * events/s, against the naive baseline (an idb-keyval write of each id).
 * Transactions are counted while events flow (the final flush excluded).
 */
async function persistenceBench() {
  const database = `tidemark-bench-${Date.now()}`;
  const rate = async (key, perTask, gapMs) => {
    const tracker = await openTracker(key, { database });
    const before = tracker.stats().storeTransactions;
    const run = await feedFor(3, perTask, gapMs, (id) => {
      if (tracker.observe(id)) tracker.commit();
    });
    const transactions = tracker.stats().storeTransactions - before;
    await tracker.close();
    return { ...run, transactions, transactionsPerSecond: transactions / run.seconds };
  };
  const fast = await rate('bench-fast', 1000, 0);
  const slow = await rate('bench-slow', 10, 20);

  // The naive baseline: await an idb-keyval write of each event's id.
  const naiveStore = createStore(`naive-${database}`, 'kv');
  const naive = await feedFor(3, 100, 0, (id) => idbSet('stream', id, naiveStore));

  // Fire-and-forget variant: start 5000 writes, then wait for them all.
  const ffStore = createStore(`naive-ff-${database}`, 'kv');
  const pending = [];
  const t0 = performance.now();
  for (let id = 1; id <= 5000; id++) pending.push(idbSet('stream', String(id), ffStore));
  await Promise.all(pending);
  const ffRate = 5000 / ((performance.now() - t0) / 1000);

  return {
    tidemarkEventsPerSecond: fast.eventsPerSecond,
    naiveAwaitedEventsPerSecond: naive.eventsPerSecond,
    naiveFireAndForgetEventsPerSecond: ffRate,
    speedupOverAwaited: fast.eventsPerSecond / naive.eventsPerSecond,
    speedupOverFireAndForget: fast.eventsPerSecond / ffRate,
    fast,
    slow,
  };
}

/**
 * Opens a stream with `open()`, counts its `message` events until the
 * `n`th, closes it and returns the events/s from just before `open()` to the
 * `n`th event (connecting included). Both contenders get the same listener.
 * Fails if the `n`th event has not arrived after `limitMs`, e.g. when the
 * server serves fewer than `n` events or not at `--interval-ms 0`.
 */
function streamRun(open, n, limitMs = 120_000) {
  return new Promise((resolve, reject) => {
    let count = 0;
    const t0 = performance.now();
    const source = open();
    const timer = setTimeout(() => {
      source.close();
      reject(new Error(`${count} of ${n} events in ${limitMs} ms`));
    }, limitMs);
    source.onmessage = (event) => {
      if (++count !== n) return;
      const seconds = (performance.now() - t0) / 1000;
      clearTimeout(timer);
      // EventSource reconnects by itself when the server ends the stream:
      // close at once. ResumableEventSource's close() resolves once its
      // cursor is written (in memory here), outside the timed part.
      const closed = source.close();
      const lastEventId = event.lastEventId;
      Promise.resolve(closed).then(() => {
        if (lastEventId !== String(n)) return reject(new Error(`event ${n} had id ${lastEventId}`));
        const stats = source instanceof ResumableEventSource ? source.stats() : undefined;
        resolve({
          events: n,
          seconds,
          eventsPerSecond: n / seconds,
          ...(stats && { duplicates: stats.duplicates, reconnects: stats.reconnects }),
        });
      }, reject);
    };
  });
}

/**
 * ResumableEventSource (in-memory store, a fresh streamKey per run, so each
 * run reads from event 1) against the browser's EventSource on the same
 * `url`, alternating, `rounds` runs of `n` events each after one shorter
 * untimed warm-up run of each. The stream must serve at least `n` events
 * as fast as it can: `tidemark serve --interval-ms 0 --count N` with N ≥ n.
 */
async function liveStreamBench({ url = '/events', n = 200_000, rounds = 5, warmup = 20_000 } = {}) {
  let key = 0;
  const contenders = {
    tidemark: () =>
      new ResumableEventSource(url, { store: 'memory', streamKey: `bench-live-${Date.now()}-${key++}` }),
    eventSource: () => new EventSource(url),
  };
  const runs = { tidemark: [], eventSource: [] };
  for (let r = -1; r < rounds; r++) {
    for (const [name, open] of Object.entries(contenders)) {
      const result = await streamRun(open, r < 0 ? warmup : n);
      if (r >= 0) runs[name].push(result);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
  const medians = {
    tidemark: median(runs.tidemark.map((x) => x.eventsPerSecond)),
    eventSource: median(runs.eventSource.map((x) => x.eventsPerSecond)),
  };
  return {
    url,
    events: n,
    rounds,
    warmupEvents: warmup,
    runs,
    medians,
    ratio: medians.tidemark / medians.eventSource,
  };
}

/**
 * Runs every benchmark. `options.liveStream` goes to liveStreamBench
 * (`{ url, n, rounds, warmup }`), or `false` to leave it out.
 */
async function run(options = {}) {
  const out = document.getElementById('out');
  out.textContent = 'running...';
  await initialize();
  const results = {
    userAgent: navigator.userAgent,
    observeNumeric: await observeBench('numeric'),
    observeUuid: await observeBench('uuid'),
    persistence: await persistenceBench(),
  };
  if (options.liveStream !== false) results.liveStream = await liveStreamBench(options.liveStream);
  out.textContent = JSON.stringify(results, null, 2);
  globalThis.benchResults = results;
  return results;
}

document.getElementById('run').onclick = () => run();
globalThis.runBench = run;
globalThis.runLiveStreamBench = liveStreamBench;
if (new URLSearchParams(location.search).has('auto')) run();
