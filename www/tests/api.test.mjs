// The JavaScript API of the `tidemark` package in real Chromium, against
// scripted SSE servers: a Node `http` server on 127.0.0.1 (port 0) serves a
// test page, a module worker, the package (host-wasm/js/index.js and the
// wasm glue built into host-wasm/pkg) and the SSE endpoints each test
// scripts. Page, package and streams share one origin: no CORS involved.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { launchBrowser, servePackage, until } from './harness.mjs';

const RECONNECT = { initialDelay: 50, maxDelay: 200 };

// ---------------------------------------------------------------------------
// The test server.

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tidemark api test</title>
<script>
  globalThis.unhandled = [];
  addEventListener('unhandledrejection', (e) => unhandled.push(String(e.reason?.message ?? e.reason)));
  addEventListener('error', (e) => unhandled.push(String(e.message)));
</script>
<script type="module">
  import * as tm from '/tidemark/index.js';
  globalThis.tm = tm;
  const q = new URLSearchParams(location.search);
  if (q.has('stream')) {
    // Auto-start, for reloads: the ids this page load got.
    globalThis.got = [];
    globalThis.source = new tm.ResumableEventSource(q.get('stream'), {
      streamKey: q.get('key') ?? undefined,
      reconnect: ${JSON.stringify(RECONNECT)},
    });
    source.onmessage = (e) => got.push(e.lastEventId);
  }
  globalThis.ready = true;
</script></head><body><p>tidemark api test</p></body></html>`;

const WORKER = `
import { ResumableEventSource } from '/tidemark/index.js';
const q = new URL(self.location.href).searchParams;
postMessage({ kind: 'env', window: typeof window, document: typeof document });
const source = new ResumableEventSource(q.get('stream'), { reconnect: ${JSON.stringify(RECONNECT)} });
source.onopen = () => postMessage({ kind: 'open', readyState: source.readyState });
source.onmessage = (e) => postMessage({ kind: 'event', id: e.lastEventId, data: e.data });
source.onerror = (e) => postMessage({ kind: 'error', readyState: source.readyState, message: e.message });
self.onmessage = async (m) => {
  if (m.data === 'close') {
    await source.close();
    postMessage({ kind: 'closed', readyState: source.readyState, stats: source.stats() });
  }
};
`;

/**
 * Starts the server. `route(path, handler)` scripts an endpoint:
 * `handler(req, res, record, n)` with `record` this request's entry in
 * `requests(path)` and `n` its 1-based number on that path.
 */
async function startTestServer() {
  const routes = new Map();
  const log = new Map();
  const server = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    try {
      if (url.pathname === '/page.html') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
        return res.end(PAGE);
      }
      if (url.pathname === '/worker.js') {
        res.writeHead(200, { 'content-type': 'text/javascript', 'cache-control': 'no-store' });
        return res.end(WORKER);
      }
      if (await servePackage(url.pathname, res)) return;
      const handler = routes.get(url.pathname);
      if (!handler) {
        res.writeHead(404, { 'content-type': 'text/plain' });
        return res.end('no such route');
      }
      const records = log.get(url.pathname) ?? [];
      log.set(url.pathname, records);
      const record = { headers: req.headers, lastEventId: req.headers['last-event-id'], closed: false };
      records.push(record);
      res.on('close', () => (record.closed = true));
      handler(req, res, record, records.length);
    } catch (error) {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(String(error));
    }
  });
  await new Promise((ok, fail) => {
    server.once('error', fail);
    server.listen(0, '127.0.0.1', ok);
  });
  // Bound to port 0 and read back: the port is this server's.
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    route(path, handler) {
      routes.set(path, handler);
    },
    requests(path) {
      return log.get(path) ?? [];
    },
    async stop() {
      server.closeAllConnections();
      await new Promise((ok) => server.close(ok));
    },
  };
}

/** Starts an SSE response. */
function open(res) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  res.flushHeaders();
}

/** Writes one event; multi-line data becomes several `data:` lines. */
function send(res, { id, event, data }) {
  let out = '';
  if (event !== undefined) out += `event: ${event}\n`;
  if (id !== undefined) out += `id: ${id}\n`;
  for (const line of String(data).split('\n')) out += `data: ${line}\n`;
  res.write(`${out}\n`);
}

/** Writes events `from..to` (ids and data are the numbers). */
function sendRange(res, from, to) {
  for (let id = from; id <= to; id++) send(res, { id, data: `event ${id}` });
}

/** Polls `predicate` in Node until it holds; fails after `ms`. */
async function waitFor(predicate, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function exactlyOnceInOrder(ids, n) {
  assert.deepEqual(
    ids.map(Number),
    Array.from({ length: n }, (_, i) => i + 1),
    `ids 1..${n} exactly once and in order, got ${ids}`,
  );
}

// ---------------------------------------------------------------------------

let browser;
let server;
before(async () => {
  server = await startTestServer();
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await server?.stop();
});

/** A new page on the test page, the package loaded as `globalThis.tm`. */
async function newPage(query = '') {
  const page = await browser.context.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(`${server.url}/page.html${query}`);
  await until(page, () => globalThis.ready === true, undefined, 10_000);
  return page;
}

/** Awaits `promise` in the page, failing after `ms` instead of hanging. */
const IN_TIME = `(promise, ms, what) => Promise.race([promise, new Promise((_, no) => setTimeout(() => no(new Error(what + ' timed out')), ms))])`;

test('named events, default events, open, readyState, url', { timeout: 30_000 }, async () => {
  server.route('/api1/stream', (req, res) => {
    open(res);
    send(res, { id: 1, data: 'hello' });
    send(res, { id: 2, event: 'update', data: 'line1\nline2' });
    send(res, { id: 3, data: 'plain' });
    send(res, { id: 4, event: 'update', data: '{"x":1}' });
    // Held open; the test closes the source.
  });
  const page = await newPage();
  try {
    const before = await page.evaluate(() => {
      const { ResumableEventSource } = tm;
      const log = [];
      // Relative: resolved against the page's URL.
      const source = new ResumableEventSource('api1/stream', { reconnect: { initialDelay: 50, maxDelay: 200 } });
      globalThis.t1 = { source, log };
      source.onopen = (e) => log.push({ kind: 'open', type: e.type, readyState: source.readyState });
      source.onmessage = (e) =>
        log.push({ kind: 'onmessage', type: e.type, data: e.data, id: e.lastEventId, origin: e.origin });
      source.addEventListener('update', (e) =>
        log.push({ kind: 'update', type: e.type, data: e.data, id: e.lastEventId, origin: e.origin }),
      );
      source.onerror = (e) => log.push({ kind: 'error', readyState: source.readyState, message: e.message });
      return {
        readyState: source.readyState,
        url: source.url,
        statics: [ResumableEventSource.CONNECTING, ResumableEventSource.OPEN, ResumableEventSource.CLOSED],
        instance: [source.CONNECTING, source.OPEN, source.CLOSED],
        isEventTarget: source instanceof EventTarget,
        handlerBack: source.onmessage !== null && source.onerror !== null && source.onopen !== null,
      };
    });
    assert.equal(before.readyState, 0, 'CONNECTING right after construction');
    assert.equal(before.url, `${server.url}/api1/stream`);
    assert.deepEqual(before.statics, [0, 1, 2]);
    assert.deepEqual(before.instance, [0, 1, 2]);
    assert.ok(before.isEventTarget);
    assert.ok(before.handlerBack, 'on* getters return the handlers set');

    await until(page, () => t1.log.length >= 5, undefined, 10_000);
    const state = await page.evaluate(() => ({
      log: t1.log,
      readyState: t1.source.readyState,
      lastEventId: t1.source.lastEventId,
    }));
    const origin = server.url;
    assert.deepEqual(state.log, [
      { kind: 'open', type: 'open', readyState: 1 },
      { kind: 'onmessage', type: 'message', data: 'hello', id: '1', origin },
      { kind: 'update', type: 'update', data: 'line1\nline2', id: '2', origin },
      { kind: 'onmessage', type: 'message', data: 'plain', id: '3', origin },
      { kind: 'update', type: 'update', data: '{"x":1}', id: '4', origin },
    ]);
    assert.equal(state.readyState, 1, 'OPEN while streaming');
    assert.equal(state.lastEventId, '4');

    // Removing onmessage stops default events from reaching it.
    await page.evaluate(() => {
      t1.source.onmessage = null;
    });
    assert.equal(await page.evaluate(() => t1.source.onmessage), null);
    assert.equal(server.requests('/api1/stream').length, 1, 'one connection');
    await page.evaluate(`(${IN_TIME})(t1.source.close(), 10000, 'close()')`);
  } finally {
    await page.close();
  }
});

test('a dropped stream resumes with Last-Event-ID and replays are delivered once', { timeout: 30_000 }, async () => {
  // Connection n sends ids 1..3n (it ignores Last-Event-ID and starts over)
  // and closes, up to 9; the fourth sends 1..9 again and stays open.
  server.route('/api2/stream', (req, res, record, n) => {
    open(res);
    sendRange(res, 1, Math.min(3 * n, 9));
    if (n <= 3) res.end();
  });
  const page = await newPage();
  try {
    await page.evaluate(() => {
      const log = [];
      const errors = [];
      const source = new tm.ResumableEventSource('/api2/stream', { reconnect: { initialDelay: 50, maxDelay: 200 } });
      globalThis.t2 = { source, log, errors };
      source.onopen = () => log.push(`open${source.readyState}`);
      source.onmessage = (e) => log.push(e.lastEventId);
      source.onerror = (e) => {
        log.push(`error${source.readyState}:${e.message}`);
        errors.push({ retryDelay: e.retryDelay, attempt: e.attempt, reconnects: source.stats().reconnects });
      };
    });
    await waitFor(() => server.requests('/api2/stream').length >= 4, 'the fourth connection');
    await until(page, () => t2.log.filter((x) => x === 'open1').length === 4, undefined, 10_000);
    await sleep(300); // anything replayed late would show up now
    const log = await page.evaluate(() => t2.log);
    const ids = log.filter((x) => /^\d+$/.test(x));
    exactlyOnceInOrder(ids, 9);
    const drop = (entry) => /^error0:.*closed/.test(entry);
    const shape = log.map((x) => (drop(x) ? 'drop' : x));
    assert.deepEqual(shape, [
      'open1', '1', '2', '3', 'drop',
      'open1', '4', '5', '6', 'drop',
      'open1', '7', '8', '9', 'drop',
      'open1',
    ], `events, drops (error with readyState 0) and opens in order: ${JSON.stringify(log)}`);
    assert.deepEqual(
      server.requests('/api2/stream').map((r) => r.lastEventId),
      [undefined, '3', '6', '9'],
      'each reconnect sends the last delivered id',
    );
    // connects changes with the connection, at once.
    assert.equal(await page.evaluate(() => t2.source.stats().connects), 4);
    // Each drop says when the next attempt is (the first backoff step, 50 ms
    // plus jitter, as the connection had data) and that it is the first in a
    // row; the stats a listener reads already count the reconnect.
    const errors = await page.evaluate(() => t2.errors);
    assert.equal(errors.length, 3, JSON.stringify(errors));
    errors.forEach((e, i) => {
      assert.equal(e.attempt, 1, JSON.stringify(errors));
      assert.ok(e.retryDelay >= 45 && e.retryDelay <= 80, `retryDelay ${e.retryDelay}: ${JSON.stringify(errors)}`);
      assert.equal(e.reconnects, i + 1);
    });
    // Replays dropped after the last delivered event show after close().
    await page.evaluate(`(${IN_TIME})(t2.source.close(), 10000, 'close()')`);
    const stats = await page.evaluate(() => t2.source.stats());
    assert.equal(stats.duplicates, 3 + 6 + 9, 'every replay dropped');
    assert.equal(stats.delivered, 9);
    assert.equal(stats.connects, 4);
    assert.equal(stats.reconnects, 3);
    assert.match(stats.lastFailure, /closed/);
    assert.equal(stats.lastEventId, '9');
  } finally {
    await page.close();
  }
});

test('the headers option goes with every request: object, pairs and Headers', { timeout: 30_000 }, async () => {
  const paths = ['/api3/object', '/api3/pairs', '/api3/headers'];
  for (const path of paths) {
    // Connection n sends id n and closes: every test request is a reconnect.
    server.route(path, (req, res, record, n) => {
      open(res);
      send(res, { id: n, data: `n${n}` });
      if (n < 3) res.end();
    });
  }
  const page = await newPage();
  try {
    await page.evaluate(() => {
      const reconnect = { initialDelay: 50, maxDelay: 200 };
      globalThis.t3 = [
        new tm.ResumableEventSource('/api3/object', {
          reconnect,
          headers: { Authorization: 'Bearer object-token', 'X-Test': 'from-object' },
        }),
        new tm.ResumableEventSource('/api3/pairs', {
          reconnect,
          headers: [
            ['Authorization', 'Bearer pairs-token'],
            ['X-Test', 'from-pairs'],
          ],
        }),
        new tm.ResumableEventSource('/api3/headers', {
          reconnect,
          headers: new Headers({ Authorization: 'Bearer headers-token', 'X-Test': 'from-headers' }),
        }),
      ];
    });
    for (const path of paths) {
      await waitFor(() => server.requests(path).length >= 3, `three connections on ${path}`);
    }
    await page.evaluate(`(${IN_TIME})(Promise.all(t3.map((s) => s.close())), 10000, 'close()')`);
    const expected = {
      '/api3/object': ['Bearer object-token', 'from-object'],
      '/api3/pairs': ['Bearer pairs-token', 'from-pairs'],
      '/api3/headers': ['Bearer headers-token', 'from-headers'],
    };
    for (const path of paths) {
      const seen = server.requests(path).map((r) => [r.headers.authorization, r.headers['x-test']]);
      assert.ok(seen.length >= 3);
      for (const pair of seen) assert.deepEqual(pair, expected[path], `${path}: ${JSON.stringify(seen)}`);
      const first = server.requests(path)[0].headers;
      assert.equal(first.accept, 'text/event-stream');
      assert.deepEqual(
        server.requests(path).slice(0, 3).map((r) => r.lastEventId),
        [undefined, '1', '2'],
        `${path} resumes`,
      );
    }
  } finally {
    await page.close();
  }
});

test('404 and 401 stop the stream for good: error with CLOSED, no retries', { timeout: 30_000 }, async () => {
  server.route('/api4/404', (req, res) => {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not here');
  });
  server.route('/api4/401', (req, res) => {
    res.writeHead(401, { 'content-type': 'text/plain', 'www-authenticate': 'Bearer' });
    res.end('who are you');
  });
  const page = await newPage();
  try {
    await page.evaluate(() => {
      globalThis.t4 = {};
      for (const status of ['404', '401']) {
        const errors = [];
        const source = new tm.ResumableEventSource(`/api4/${status}`, {
          reconnect: { initialDelay: 50, maxDelay: 200 },
        });
        source.onerror = (e) =>
          errors.push({
            readyState: source.readyState,
            message: e.message ?? null,
            retry: [e.retryDelay ?? null, e.attempt ?? null],
          });
        source.onopen = () => errors.push({ open: true });
        t4[status] = { source, errors };
      }
    });
    await until(
      page,
      () => ['404', '401'].every((s) => t4[s].errors.some((e) => e.readyState === 2)),
      undefined,
      10_000,
    );
    const counts = { '404': server.requests('/api4/404').length, '401': server.requests('/api4/401').length };
    await sleep(1_000);
    for (const status of ['404', '401']) {
      const { errors, readyState } = await page.evaluate((s) => ({ ...t4[s], source: undefined, readyState: t4[s].source.readyState }), status);
      assert.equal(readyState, 2, `${status}: CLOSED`);
      assert.ok(!errors.some((e) => e.open), `${status}: never opened`);
      // As with EventSource: one `error`, with CLOSED.
      assert.equal(errors.length, 1, `${status}: one error: ${JSON.stringify(errors)}`);
      assert.equal(errors[0].readyState, 2, `${status}: the error comes with CLOSED`);
      assert.match(errors[0].message, new RegExp(status));
      assert.deepEqual(errors[0].retry, [null, null], `${status}: no next attempt`);
      assert.equal(server.requests(`/api4/${status}`).length, 1, `${status}: one request, no retry`);
      assert.equal(counts[status], 1);
    }
    // close() after a permanent failure resolves at once.
    await page.evaluate(`(${IN_TIME})(Promise.all([t4['404'].source.close(), t4['401'].source.close()]), 5000, 'close()')`);
  } finally {
    await page.close();
  }
});

test('close() resolves, closes the connection and writes the cursor', { timeout: 30_000 }, async () => {
  server.route('/api5/stream', (req, res) => {
    open(res);
    sendRange(res, 1, 5);
  });
  const page = await newPage();
  try {
    await page.evaluate(() => {
      const got = [];
      const source = new tm.ResumableEventSource('/api5/stream', {
        streamKey: 'api5 key',
        reconnect: { initialDelay: 50, maxDelay: 200 },
      });
      source.onmessage = (e) => got.push(e.lastEventId);
      globalThis.t5 = { source, got };
    });
    await until(page, () => t5.got.length === 5, undefined, 10_000);
    const [record] = server.requests('/api5/stream');
    assert.equal(record.closed, false, 'the stream is open before close()');
    const result = await page.evaluate(`(async () => {
      const promise = t5.source.close();
      const isPromise = promise instanceof Promise;
      const during = t5.source.readyState;
      const value = await (${IN_TIME})(promise, 10000, 'close()');
      return { isPromise, during, value: value === undefined ? 'undefined' : String(value), after: t5.source.readyState };
    })()`);
    assert.deepEqual(result, { isPromise: true, during: 2, value: 'undefined', after: 2 });
    await waitFor(() => record.closed, 'the server to see the request close', 5_000);
    // A second close() resolves too.
    await page.evaluate(`(${IN_TIME})(t5.source.close(), 5000, 'second close()')`);

    // Another page, with the first still open (no pagehide flush): the
    // cursor close() wrote is in IndexedDB.
    const other = await newPage();
    try {
      const seen = await other.evaluate(async () => {
        const tracker = await tm.openTracker('api5 key');
        const lastEventId = tracker.lastEventId;
        await tracker.close();
        return lastEventId;
      });
      assert.equal(seen, '5');
    } finally {
      await other.close();
    }
    await sleep(300);
    assert.equal(server.requests('/api5/stream').length, 1, 'no reconnect after close()');
    assert.deepEqual(await page.evaluate(() => t5.got), ['1', '2', '3', '4', '5']);
  } finally {
    await page.close();
  }
});

test('a reloaded page resumes from the cursor in IndexedDB', { timeout: 30_000 }, async () => {
  // Honors Last-Event-ID: the first connection gets 1..5, a resumed one
  // the ids after its Last-Event-ID up to 8. Both stay open.
  server.route('/api6/stream', (req, res, record) => {
    open(res);
    const from = record.lastEventId === undefined ? 1 : Number(record.lastEventId) + 1;
    sendRange(res, from, record.lastEventId === undefined ? 5 : 8);
  });
  const page = await newPage(`?stream=${encodeURIComponent('/api6/stream')}&key=api6`);
  try {
    await until(page, () => globalThis.got?.length === 5, undefined, 10_000);
    assert.deepEqual(await page.evaluate(() => got), ['1', '2', '3', '4', '5']);
    await page.reload();
    await until(page, () => globalThis.ready === true && globalThis.got?.length === 3, undefined, 10_000);
    await sleep(200);
    assert.deepEqual(await page.evaluate(() => got), ['6', '7', '8'], 'after the reload: only the new ids');
    assert.deepEqual(
      server.requests('/api6/stream').map((r) => r.lastEventId),
      [undefined, '5'],
    );
    assert.equal(server.requests('/api6/stream')[0].closed, true, 'the reload ended the first request');
    await page.evaluate(`(${IN_TIME})(source.close(), 10000, 'close()')`);
  } finally {
    await page.close();
  }
});

test('openTracker: observe, observeMany, lastEventId, stats, close, reopen, memory store', { timeout: 30_000 }, async () => {
  const page = await newPage();
  try {
    const r = await page.evaluate(async () => {
      const out = {};
      const tracker = await tm.openTracker('api7 tracker');
      out.initial = tracker.lastEventId ?? 'undefined';
      out.steps = [];
      const step = (what, fresh) => out.steps.push([what, fresh, tracker.lastEventId ?? 'undefined']);
      step('1', tracker.observe('1'));
      step('2', tracker.observe('2'));
      step('1 again', tracker.observe('1'));
      step('undefined', tracker.observe(undefined));
      step('null', tracker.observe(null));
      out.many = tracker.observeMany(['a', 'b', 'a']);
      out.manyEmpty = tracker.observeMany([]);
      out.afterMany = tracker.lastEventId;
      tracker.commit();
      out.stats = tracker.stats();
      try {
        await tm.openTracker('api7 tracker');
        out.twice = 'resolved';
      } catch (error) {
        out.twice = String(error?.message ?? error);
      }
      out.closed = String(await tracker.close());
      // Once closed, the key opens again in the same page, seeded.
      const again = await tm.openTracker('api7 tracker');
      out.reopened = again.lastEventId;
      out.reopenedReplay = again.observe('b');
      await again.close();

      const memory = await tm.openTracker('api7 memory', { store: 'memory' });
      memory.observe('m1');
      memory.observe('m2');
      out.memoryStats = memory.stats();
      await memory.close();
      return out;
    });
    assert.equal(r.initial, 'undefined', 'a new stream starts from the beginning');
    assert.deepEqual(r.steps, [
      ['1', true, '1'],
      ['2', true, '2'],
      ['1 again', false, '2'],
      ['undefined', true, '2'],
      ['null', true, '2'],
    ]);
    assert.deepEqual(r.many, [true, true, false]);
    assert.deepEqual(r.manyEmpty, []);
    assert.equal(r.afterMany, 'b');
    assert.equal(r.stats.observed, 8);
    assert.equal(r.stats.duplicates, 2);
    assert.equal(r.stats.store, 'indexeddb');
    assert.equal(r.stats.lastEventId, 'b');
    assert.equal(r.stats.database, 'tidemark');
    assert.match(r.twice, /already open/);
    assert.equal(r.closed, 'undefined');
    assert.equal(r.reopened, 'b');
    assert.equal(r.reopenedReplay, false, 'the stored cursor counts as seen');
    assert.equal(r.memoryStats.store, 'memory');
    assert.equal(r.memoryStats.lastEventId, 'm2');

    const other = await newPage();
    try {
      const seen = await other.evaluate(async () => {
        const tracker = await tm.openTracker('api7 tracker');
        const memory = await tm.openTracker('api7 memory', { store: 'memory' });
        const inIdb = await tm.openTracker('api7 memory');
        const out = {
          tracker: tracker.lastEventId,
          memory: memory.lastEventId ?? 'undefined',
          inIdb: inIdb.lastEventId ?? 'undefined',
        };
        await Promise.all([tracker.close(), memory.close(), inIdb.close()]);
        return out;
      });
      assert.deepEqual(seen, { tracker: 'b', memory: 'undefined', inIdb: 'undefined' });
    } finally {
      await other.close();
    }
  } finally {
    await page.close();
  }
});

test('a module Web Worker runs a ResumableEventSource', { timeout: 30_000 }, async () => {
  // The first connection sends 1..5 and closes; the second replays from 1
  // (ignoring Last-Event-ID) up to 10 and stays open.
  server.route('/api8/stream', (req, res, record, n) => {
    open(res);
    sendRange(res, 1, n === 1 ? 5 : 10);
    if (n === 1) res.end();
  });
  const page = await newPage();
  try {
    await page.evaluate(() => {
      const messages = [];
      const worker = new Worker(`/worker.js?stream=${encodeURIComponent('/api8/stream')}`, { type: 'module' });
      worker.onmessage = (m) => messages.push(m.data);
      worker.onerror = (e) => messages.push({ kind: 'worker error', message: e.message });
      globalThis.t8 = { worker, messages };
    });
    await until(page, () => t8.messages.filter((m) => m.kind === 'event').length >= 10, undefined, 10_000);
    await sleep(300);
    await page.evaluate(() => t8.worker.postMessage('close'));
    await until(page, () => t8.messages.some((m) => m.kind === 'closed'), undefined, 10_000);
    const messages = await page.evaluate(() => t8.messages);
    assert.deepEqual(messages[0], { kind: 'env', window: 'undefined', document: 'undefined' });
    assert.ok(!messages.some((m) => m.kind === 'worker error'), JSON.stringify(messages));
    const events = messages.filter((m) => m.kind === 'event');
    exactlyOnceInOrder(events.map((m) => m.id), 10);
    assert.equal(events[9].data, 'event 10');
    assert.equal(messages.filter((m) => m.kind === 'open').length, 2);
    assert.ok(messages.some((m) => m.kind === 'error' && m.readyState === 0), 'the drop is an error');
    const closed = messages.find((m) => m.kind === 'closed');
    assert.equal(closed.readyState, 2);
    assert.equal(closed.stats.store, 'indexeddb', 'IndexedDB works in the worker');
    assert.equal(closed.stats.lastEventId, '10');
    assert.deepEqual(server.requests('/api8/stream').map((r) => r.lastEventId), [undefined, '5']);
  } finally {
    await page.close();
  }
});

test('invalid options end in an error event naming the option, not a rejection', { timeout: 30_000 }, async () => {
  server.route('/api9/stream', (req, res) => {
    open(res);
    send(res, { id: 1, data: 'should not be requested' });
  });
  const page = await newPage();
  try {
    await page.evaluate(() => {
      const cases = {
        store: { store: 'bogus' },
        initialDelay: { reconnect: { initialDelay: -1 } },
        headers: { headers: 5 },
        streamKey: { streamKey: 42 },
      };
      globalThis.t9 = {};
      for (const [name, options] of Object.entries(cases)) {
        const errors = [];
        const source = new tm.ResumableEventSource('/api9/stream', options);
        source.onerror = (e) => errors.push({ readyState: source.readyState, message: e.message ?? null });
        t9[name] = { source, errors };
      }
    });
    const names = ['store', 'initialDelay', 'headers', 'streamKey'];
    // Give a swallowed error time to show up as an unhandled rejection.
    await until(page, (n) => n.every((k) => t9[k].errors.length > 0) || unhandled.length >= n.length, names, 10_000)
      .catch(() => {});
    const state = await page.evaluate(
      (n) => ({
        unhandled,
        cases: Object.fromEntries(n.map((k) => [k, { errors: t9[k].errors, readyState: t9[k].source.readyState }])),
      }),
      names,
    );
    assert.deepEqual(state.unhandled, [], 'no unhandled rejections');
    for (const name of names) {
      const { errors, readyState } = state.cases[name];
      assert.equal(readyState, 2, `${name}: CLOSED`);
      assert.equal(errors.length, 1, `${name}: one error event: ${JSON.stringify(errors)}`);
      assert.equal(errors[0].readyState, 2);
      assert.match(errors[0].message, new RegExp(`\`${name}\``), `${name}: the message names the option`);
    }
    await page.evaluate(
      `(${IN_TIME})(Promise.all(Object.values(t9).map((c) => c.source.close())), 5000, 'close() after a bad option')`,
    );
    assert.equal(server.requests('/api9/stream').length, 0, 'no request with invalid options');
  } finally {
    await page.close();
  }
});

test('maxAttempts: null keeps trying past the default budget of 10', { timeout: 30_000 }, async () => {
  server.route('/api10/stream', (req, res, record, n) => {
    if (n <= 12) {
      res.writeHead(503, { 'content-type': 'text/plain' });
      return res.end('busy');
    }
    open(res);
    sendRange(res, 1, 3);
  });
  const page = await newPage();
  try {
    const got = await page.evaluate(`(${IN_TIME})(new Promise((resolve) => {
      const source = new tm.ResumableEventSource('/api10/stream', {
        streamKey: 'api10',
        reconnect: { initialDelay: 10, maxDelay: 20, maxAttempts: null },
      });
      const got = [];
      const errors = [];
      source.onerror = (e) => errors.push({ readyState: source.readyState, message: e.message, attempt: e.attempt });
      source.onopen = () => errors.push('open');
      source.onmessage = (e) => {
        got.push(e.lastEventId);
        if (got.length === 3) source.close().then(() => resolve({ got, errors, readyState: source.readyState }));
      };
    }), 20000, 'the 13th attempt')`);
    assert.deepEqual(got.got, ['1', '2', '3']);
    assert.equal(server.requests('/api10/stream').length, 13);
    // Attempts that receive nothing count up, one error each, then the open.
    const attempts = Array.from({ length: 12 }, (_, i) => ({
      readyState: 0,
      message: 'server answered HTTP 503',
      attempt: i + 1,
    }));
    assert.deepEqual(got.errors, [...attempts, 'open']);
  } finally {
    await page.close();
  }
});

test('close() from a listener: no event after it, and the cursor is the last one delivered', { timeout: 30_000 }, async () => {
  server.route('/api11/stream', (req, res) => {
    open(res);
    sendRange(res, 1, 10); // one chunk: ten events ready at once
  });
  const page = await newPage();
  try {
    const out = await page.evaluate(`(${IN_TIME})(new Promise((resolve) => {
      const source = new tm.ResumableEventSource('/api11/stream', { streamKey: 'api11' });
      const got = [];
      source.onmessage = (e) => {
        got.push(e.lastEventId);
        if (e.lastEventId === '3') {
          source.close().then(() => setTimeout(() => resolve({ got, stats: source.stats() }), 200));
        }
      };
    }), 10000, 'close')`);
    assert.deepEqual(out.got, ['1', '2', '3']);
    assert.equal(out.stats.lastEventId, '3');
    const stored = await page.evaluate(async () => (await tm.openTracker('api11')).lastEventId);
    assert.equal(stored, '3');
  } finally {
    await page.close();
  }
});

test('tracker misuse fails loudly: observe after close, ids with line breaks, a key used twice', { timeout: 30_000 }, async () => {
  server.route('/api12/stream', (req, res) => {
    open(res);
    sendRange(res, 1, 2);
  });
  const page = await newPage();
  try {
    const out = await page.evaluate(async () => {
      const errorOf = async (f) => {
        try {
          await f();
          return null;
        } catch (e) {
          return String(e.message ?? e);
        }
      };
      const tracker = await tm.openTracker('api12-tracker', { store: 'memory' });
      tracker.observe('1');
      const lineBreak = await errorOf(() => tracker.observeMany(['2', 'a\nb']));
      // observe() while a flush is pending: the flush holds no borrow.
      const pending = tracker.flush();
      const during = tracker.observe('3');
      await pending;
      tracker.commit();
      await tracker.close();
      const afterClose = await errorOf(() => tracker.observe('4'));
      const commitAfterClose = await errorOf(() => tracker.commit());
      const last = tracker.lastEventId;
      // Two sources on one stream key: the second stops with a clear error.
      const first = new tm.ResumableEventSource('/api12/stream', { streamKey: 'api12' });
      const second = new tm.ResumableEventSource('/api12/stream', { streamKey: 'api12' });
      const secondError = await new Promise((resolve) => (second.onerror = (e) => resolve({ message: e.message, readyState: second.readyState })));
      await first.close();
      return { lineBreak, during, afterClose, commitAfterClose, last, secondError };
    });
    assert.match(out.lineBreak, /line breaks/);
    assert.equal(out.during, true);
    assert.match(out.afterClose, /closed/);
    assert.match(out.commitAfterClose, /closed/);
    assert.equal(out.last, '3', 'the cursor stays readable after close()');
    assert.equal(out.secondError.readyState, 2);
    assert.match(out.secondError.message, /streamKey "api12" is already in use/);
  } finally {
    await page.close();
  }
});

test('maxAttempts: errors with CONNECTING while attempts count up, then one with CLOSED', { timeout: 30_000 }, async () => {
  server.route('/api14/stream', (req, res) => {
    res.writeHead(503, { 'content-type': 'text/plain' });
    res.end('busy');
  });
  const page = await newPage();
  try {
    const errors = await page.evaluate(`(${IN_TIME})(new Promise((resolve) => {
      const source = new tm.ResumableEventSource('/api14/stream', {
        streamKey: 'api14',
        reconnect: { initialDelay: 10, maxDelay: 20, maxAttempts: 3 },
      });
      const errors = [];
      source.onerror = (e) => {
        errors.push({ readyState: source.readyState, message: e.message, attempt: e.attempt ?? null });
        if (source.readyState === source.CLOSED) resolve(errors);
      };
    }), 10000, 'giving up')`);
    assert.deepEqual(errors.slice(0, 2), [
      { readyState: 0, message: 'server answered HTTP 503', attempt: 1 },
      { readyState: 0, message: 'server answered HTTP 503', attempt: 2 },
    ]);
    assert.equal(errors.length, 3, JSON.stringify(errors));
    assert.equal(errors[2].readyState, 2);
    assert.equal(errors[2].attempt, null);
    assert.match(errors[2].message, /503 \(giving up after 3 attempts without data\)/);
    assert.equal(server.requests('/api14/stream').length, 3);
  } finally {
    await page.close();
  }
});

test('tracker: observe only classifies, commit moves the stored cursor (reopen and reload)', { timeout: 30_000 }, async () => {
  const page = await newPage();
  try {
    const r = await page.evaluate(async () => {
      const tracker = await tm.openTracker('api13 reopen');
      const out = {};
      out.first = tracker.observe('1');
      tracker.commit();
      out.second = tracker.observe('2');
      // Seen before its commit: a replay all the same.
      out.secondAgain = tracker.observe('2');
      // In this page, lastEventId is what a reconnect sends: the observed id.
      out.inPage = tracker.lastEventId;
      await tracker.flush();
      await tracker.close();
      // The uncommitted '2' was not handled: the cursor is before it.
      out.afterClose = tracker.lastEventId;
      const again = await tm.openTracker('api13 reopen');
      out.reopened = again.lastEventId;
      out.repeated = again.observe('2');
      again.commit();
      await again.close();
      const third = await tm.openTracker('api13 reopen');
      out.thirdOpen = third.lastEventId;
      out.thirdReplay = third.observe('2');
      await third.close();
      return out;
    });
    assert.deepEqual(r, {
      first: true,
      second: true,
      secondAgain: false,
      inPage: '2',
      afterClose: '1',
      reopened: '1',
      repeated: true,
      thirdOpen: '2',
      thirdReplay: false,
    });

    // Across reloads: only committed ids are the cursor; observeMany's batch moves it at its commit, to its last
    // fresh id.
    const step = (script) => page.evaluate(`(async () => {
      const tracker = await tm.openTracker('api13 reload');
      const out = { loaded: tracker.lastEventId ?? null };
      ${script}
      // Writes the committed cursor now; what was only observed stays out.
      await tracker.flush();
      globalThis.keep = tracker; // open while the page unloads
      return out;
    })()`);
    const reload = async () => {
      await page.reload();
      await until(page, () => globalThis.ready === true, undefined, 10_000);
    };
    assert.deepEqual(await step(`out.fresh = tracker.observe('1'); tracker.commit(); out.fresh2 = tracker.observe('2');`), {
      loaded: null,
      fresh: true,
      fresh2: true,
    });
    await reload();
    assert.deepEqual(await step(`out.fresh = tracker.observeMany(['2', '3', '4', '3']);`), {
      loaded: '1',
      fresh: [true, true, true, false],
    });
    await reload();
    assert.deepEqual(await step(`out.fresh = tracker.observeMany(['2', '3', '4', '3']); tracker.commit(); tracker.observe('5');`), {
      loaded: '1',
      fresh: [true, true, true, false],
    });
    await reload();
    assert.deepEqual(await step(`out.fresh = tracker.observe('4');`), { loaded: '4', fresh: false });
  } finally {
    await page.close();
  }
});

test('mcpResumption commits after the progress handler, and in the next task for events without one', { timeout: 30_000 }, async () => {
  const page = await newPage();
  try {
    const r = await page.evaluate(async () => {
      const out = { shown: [], replays: [], inHandler: [] };
      const open = () => tm.openTracker('api15 mcp', { store: 'memory' });
      let tracker = await open();
      let hooks = tm.mcpResumption(tracker, {
        onprogress: (p) => {
          out.shown.push(p.progress);
          out.inHandler.push(tracker.lastEventId);
        },
        onreplay: (token) => out.replays.push(token),
      });
      out.tokenAtStart = hooks.resumptionToken ?? null;
      // The SDK's order: a token, then its message's progress handler.
      hooks.onresumptiontoken('1');
      hooks.onprogress({ progress: 1 });
      // A token whose progress handler never ran (the page died first).
      hooks.onresumptiontoken('2');
      await tracker.close();
      out.afterUnhandled = tracker.lastEventId ?? null;

      tracker = await open();
      hooks = tm.mcpResumption(tracker, {
        onprogress: (p) => out.shown.push(p.progress),
        onreplay: (token) => out.replays.push(token),
      });
      out.resumedFrom = hooks.resumptionToken ?? null;
      hooks.onresumptiontoken('1'); // a server that re-sends the token's event
      hooks.onprogress({ progress: 1 });
      hooks.onresumptiontoken('2');
      hooks.onprogress({ progress: 2 });
      // A priming event: a token and no message. Committed in the next task.
      hooks.onresumptiontoken('p');
      await new Promise((r) => setTimeout(r, 50));
      await tracker.close();
      out.afterPriming = tracker.lastEventId ?? null;

      // A token observed right before the call ends and the tracker closes:
      // the deferred commit finds it closed, quietly.
      tracker = await open();
      hooks = tm.mcpResumption(tracker, {});
      hooks.onresumptiontoken('end');
      await tracker.close();
      await new Promise((r) => setTimeout(r, 50));
      out.afterEnd = tracker.lastEventId ?? null;
      out.unhandled = globalThis.unhandled;
      return out;
    });
    assert.deepEqual(r, {
      shown: [1, 2],
      replays: ['1'],
      inHandler: ['1'],
      tokenAtStart: null,
      afterUnhandled: '1',
      resumedFrom: '1',
      afterPriming: 'p',
      afterEnd: 'p',
      unhandled: [],
    });
  } finally {
    await page.close();
  }
});
