// Benchmarks of the tidemark package against baselines in the same page:
// 1. observe() through the wasm API against a pure-JS tracker (a Set and an
//    array ring of the last 1024 ids), per event; also batched.
// 2. sustained events/s with persistence in IndexedDB against a naive
//    baseline that writes each event id with idb-keyval; and IndexedDB
//    transactions per second at two event rates.
// Results land in `globalThis.benchResults` and on the page.
import { openTracker, initialize } from 'tidemark';
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

/**
 * Ids as servers send them: increasing, every 10th event a replay of one 5
 * back. `shape` is 'numeric' ("1", "2", ...) or 'uuid' (36 characters, like
 * most MCP servers' ids). Every call makes new strings the way an SSE parser
 * does, by splitting decoded text: a string's hash is cached inside it once
 * a Set has seen it, so sharing strings between contenders would favour
 * whichever runs second, and strings glued from parts (ropes) would make
 * every contender pay for flattening them.
 */
function makeIds(n, shape, salt) {
  const hex = (x, w) => (x >>> 0).toString(16).padStart(w, '0').slice(-w);
  const make =
    shape === 'numeric'
      ? (i) => `${i}`
      : (i) => `${hex(salt, 8)}-${hex(i >>> 16, 4)}-4${hex(i, 3)}-8${hex(i * 7, 3)}-${hex(i * 2654435761, 8)}${hex(i, 4)}`;
  const ids = [];
  for (let i = 1; ids.length < n; i++) {
    ids.push(make(i));
    if (i % 10 === 0) ids.push(make(i - 5));
  }
  return ids.join('\n').split('\n');
}

const median = (xs) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const yieldToLoop = () => new Promise((r) => setTimeout(r, 0));

async function observeBench(shape) {
  const n = 200_000;
  const rounds = 9;
  let key = 0;
  let salt = 1;
  const ids = () => makeIds(n, shape, salt++);
  const prepare = async (count) => {
    const out = [];
    for (let i = 0; i < count; i++) out.push(await openTracker(`bench-observe-${shape}-${key++}`, { store: 'memory' }));
    return out;
  };
  // Warm both sides up (JIT, wasm tiering).
  {
    const warm = await prepare(2);
    for (const id of ids()) warm[0].observe(id);
    warm[1].observeMany(ids());
    const js = new JsTracker();
    for (const id of ids()) js.observe(id);
    await warm[0].close();
    await warm[1].close();
  }
  const times = { js: [], wasm: [], wasmBatched: [] };
  const perEvent = (t0) => ((performance.now() - t0) * 1e6) / n;
  // Interleave the contenders so drift in machine load hits all alike.
  for (let r = 0; r < rounds; r++) {
    const [single, batched] = await prepare(2);
    const js = new JsTracker();
    let input = ids();
    let t0 = performance.now();
    let a = 0;
    for (const id of input) if (js.observe(id)) a++;
    times.js.push(perEvent(t0));
    input = ids();
    t0 = performance.now();
    let b = 0;
    for (const id of input) if (single.observe(id)) b++;
    times.wasm.push(perEvent(t0));
    input = ids();
    t0 = performance.now();
    let c = 0;
    for (let i = 0; i < input.length; i += 256) {
      for (const fresh of batched.observeMany(input.slice(i, i + 256))) if (fresh) c++;
    }
    times.wasmBatched.push(perEvent(t0));
    if (a !== b || a !== c) throw new Error(`trackers disagree: js ${a}, wasm ${b}, batched ${c}`);
    await single.close();
    await batched.close();
    await yieldToLoop();
  }
  const js = median(times.js);
  const wasm = median(times.wasm);
  const wasmBatched = median(times.wasmBatched);
  return {
    shape,
    events: n,
    rounds,
    jsNsPerEvent: js,
    wasmNsPerEvent: wasm,
    wasmBatchedNsPerEvent: wasmBatched,
    wasmOverJs: wasm / js,
    wasmBatchedOverJs: wasmBatched / js,
  };
}

/**
 * Feeds `total` events to `handle` in tasks of `perTask`, pausing `gapMs`
 * between tasks (0: as fast as the page can), and returns events/s.
 */
async function feed(total, perTask, gapMs, handle) {
  const t0 = performance.now();
  let id = 0;
  while (id < total) {
    const end = Math.min(total, id + perTask);
    for (; id < end; ) {
      const pending = handle(String(++id));
      if (pending) await pending;
    }
    await new Promise((r) => setTimeout(r, gapMs));
  }
  return { seconds: (performance.now() - t0) / 1000 };
}

async function persistenceBench() {
  // tidemark: observe each event; the worker writes IndexedDB in the background.
  const database = `tidemark-bench-${Date.now()}`;
  const fast = await openTracker('bench-fast', { database });
  const before = fast.stats().storeTransactions;
  const fastTotal = 100_000;
  const fastRun = await feed(fastTotal, 1000, 0, (id) => void fast.observe(id));
  await fast.flush();
  const fastTx = fast.stats().storeTransactions - before;

  const slow = await openTracker('bench-slow', { database });
  const slowBefore = slow.stats().storeTransactions;
  const slowRun = await feed(1000, 10, 20, (id) => void slow.observe(id));
  await slow.flush();
  const slowTx = slow.stats().storeTransactions - slowBefore;
  await fast.close();
  await slow.close();

  // The naive baseline: await an idb-keyval write of each event's id.
  const naiveStore = createStore(`naive-bench-${Date.now()}`, 'kv');
  const naiveTotal = 2000;
  const naiveRun = await feed(naiveTotal, 100, 0, (id) => idbSet('stream', id, naiveStore));

  // Fire-and-forget variant: start every write, then wait for them all.
  const ffStore = createStore(`naive-ff-bench-${Date.now()}`, 'kv');
  const pending = [];
  const ffTotal = 5000;
  const ffT0 = performance.now();
  await feed(ffTotal, 500, 0, (id) => void pending.push(idbSet('stream', id, ffStore)));
  await Promise.all(pending);
  const ffSeconds = (performance.now() - ffT0) / 1000;

  const tidemarkRate = fastTotal / fastRun.seconds;
  const naiveRate = naiveTotal / naiveRun.seconds;
  const ffRate = ffTotal / ffSeconds;
  return {
    tidemarkEventsPerSecond: tidemarkRate,
    naiveAwaitedEventsPerSecond: naiveRate,
    naiveFireAndForgetEventsPerSecond: ffRate,
    speedupOverAwaited: tidemarkRate / naiveRate,
    speedupOverFireAndForget: tidemarkRate / ffRate,
    fast: { events: fastTotal, seconds: fastRun.seconds, transactions: fastTx, txPerSecond: fastTx / fastRun.seconds },
    slow: { events: 1000, seconds: slowRun.seconds, transactions: slowTx, txPerSecond: slowTx / slowRun.seconds },
  };
}

async function run() {
  const out = document.getElementById('out');
  out.textContent = 'running...';
  await initialize();
  const results = {
    userAgent: navigator.userAgent,
    observeNumeric: await observeBench('numeric'),
    observeUuid: await observeBench('uuid'),
    persistence: await persistenceBench(),
  };
  out.textContent = JSON.stringify(results, null, 2);
  globalThis.benchResults = results;
  return results;
}

document.getElementById('run').onclick = run;
globalThis.runBench = run;
if (new URLSearchParams(location.search).has('auto')) run();
