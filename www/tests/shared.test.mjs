// Shared streams (`shared: true`) in real Chromium: several pages and a
// dedicated worker of one origin open the same stream key, and the server
// sees one connection; the leading page closes and reloads mid-stream, and
// every page shows every event exactly once, in order. A Node `http` server
// on 127.0.0.1 serves the pages, the worker, the package and the streams:
// `/feed?s=NAME` is a replaying stream (ids and data `NAME:n`, one event
// every INTERVAL ms from the moment the test lets it go, N in all), which
// counts its connections.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { launchBrowser, servePackage, until } from './harness.mjs';

const INTERVAL = 10;
const RECONNECT = { initialDelay: 50, maxDelay: 200 };

/** The page: one source per `s` entry (`NAME.1` shared, `NAME.0` not);
 * each event's data is appended to `got[NAME]` and, across reloads, to
 * sessionStorage `shown:NAME`. */
const PAGE = `<!doctype html>
<meta charset="utf-8"><title>tidemark shared</title>
<script type="module">
  import * as tm from '/tidemark/index.js';
  const q = new URLSearchParams(location.search);
  globalThis.got = {};
  globalThis.origins = {};
  globalThis.sources = {};
  for (const entry of (q.get('s') ?? '').split(',').filter(Boolean)) {
    const [name, shared] = entry.split('.');
    got[name] = [];
    origins[name] = new Set();
    const source = new tm.ResumableEventSource((q.get('base') ?? '') + '/feed?s=' + name, {
      streamKey: 'key-' + name,
      shared: shared === '1',
      reconnect: ${JSON.stringify(RECONNECT)},
    });
    source.onmessage = (e) => {
      got[name].push(e.data);
      origins[name].add(e.origin);
      const shown = sessionStorage.getItem('shown:' + name);
      sessionStorage.setItem('shown:' + name, shown ? shown + ',' + e.data : e.data);
    };
    sources[name] = source;
  }
  globalThis.shown = (name) => (sessionStorage.getItem('shown:' + name) ?? '').split(',').filter(Boolean);
  globalThis.ready = true;
</script>`;

/** A dedicated worker following stream `s` shared; it posts each event's data. */
const WORKER = `
import { ResumableEventSource } from '/tidemark/index.js';
const name = new URL(self.location.href).searchParams.get('s');
const source = new ResumableEventSource('/feed?s=' + name, {
  streamKey: 'key-' + name, shared: true, reconnect: ${JSON.stringify(RECONNECT)},
});
source.onmessage = (e) => postMessage({ data: e.data });
self.onmessage = () => postMessage({ stats: source.stats() });
`;

/** Creates a worker of this page and collects what it posts. */
const WORKER_HOST = `<!doctype html><meta charset="utf-8"><script>
  globalThis.fromWorker = [];
  const q = new URLSearchParams(location.search);
  globalThis.worker = new Worker('/worker.js?s=' + q.get('s'), { type: 'module' });
  worker.onmessage = (m) => m.data.stats ? (globalThis.workerStats = m.data.stats) : fromWorker.push(m.data.data);
  globalThis.ready = true;
</script>`;

let browser;
let server;
/** Stream name -> { t0, n, connections, open }. */
const streams = new Map();

async function startServer() {
  const http = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    const html = (body) => {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(body);
    };
    if (url.pathname === '/page.html') return html(PAGE);
    if (url.pathname === '/worker-host.html') return html(WORKER_HOST);
    if (url.pathname === '/worker.js') {
      res.writeHead(200, { 'content-type': 'text/javascript', 'cache-control': 'no-store' });
      return res.end(WORKER);
    }
    if (await servePackage(url.pathname, res)) return;
    if (req.method === 'OPTIONS') {
      // The preflight of a stream of another origin (the 6-connection test).
      res.writeHead(204, {
        'access-control-allow-origin': '*',
        'access-control-allow-headers': 'last-event-id, cache-control, accept',
      });
      return res.end();
    }
    if (url.pathname === '/feed') {
      const name = url.searchParams.get('s');
      const stream = streams.get(name);
      if (!stream) {
        res.writeHead(404);
        return res.end();
      }
      stream.connections++;
      stream.open++;
      res.writeHead(200, {
        'content-type': 'text/event-stream',
        'cache-control': 'no-cache',
        'access-control-allow-origin': '*',
      });
      res.flushHeaders();
      // A resuming connection gets `rewind` events before its Last-Event-ID again.
      const last = req.headers['last-event-id'];
      let next = last === undefined ? 1 : Math.max(1, Number(last) + 1 - stream.rewind);
      const tick = () => {
        if (stream.t0 === undefined) return;
        const due = Math.min(stream.n, Math.floor((Date.now() - stream.t0) / INTERVAL));
        let out = '';
        for (; next <= due; next++) out += `id: ${next}\ndata: ${name}:${next}\n\n`;
        if (out) res.write(out);
      };
      tick();
      const timer = setInterval(tick, INTERVAL);
      req.on('close', () => {
        clearInterval(timer);
        stream.open--;
      });
      return;
    }
    res.writeHead(404);
    res.end();
  });
  await new Promise((ok) => http.listen(0, '127.0.0.1', ok));
  // Bound to port 0 and read back: the port is this server's.
  return { url: `http://127.0.0.1:${http.address().port}`, http };
}

/** A stream of `n` events for this test; it starts with `go()`. */
function stream(name, n, rewind = 0) {
  const s = { t0: undefined, n, rewind, connections: 0, open: 0, go: () => (s.t0 ??= Date.now()) };
  streams.set(name, s);
  return s;
}

/** The same server on a second port: another origin, for streams only. */
let other;
before(async () => {
  server = await startServer();
  other = await startServer();
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  for (const s of [server, other]) {
    s?.http.closeAllConnections();
    await new Promise((ok) => s?.http.close(ok));
  }
});

async function newPage(path) {
  const page = await browser.context.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  // SHARED_TEST_DEBUG=1 shows what the pages log.
  if (process.env.SHARED_TEST_DEBUG) page.on('console', (m) => console.error(`${path}: ${m.text()}`));
  await page.goto(`${server.url}${path}`);
  await until(page, () => globalThis.ready === true, undefined, 10_000);
  return page;
}

const count = (page, name) => page.evaluate((n) => globalThis.got[n].length, name);
const stats = (page, name) => page.evaluate((n) => globalThis.sources[n].stats(), name);
const ids = (data) => data.map((d) => Number(d.split(':')[1]));
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** Polls `predicate` in Node until it holds; fails after `ms`. */
async function waitFor(predicate, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The one page of `pages` that leads stream `name`. */
async function leaderOf(pages, name) {
  let leaders = [];
  await waitFor(async () => {
    leaders = [];
    for (const page of pages) if ((await stats(page, name)).leader) leaders.push(page);
    return leaders.length === 1;
  }, 'one leader');
  return leaders[0];
}

test('five pages, one connection; the leader closes, then the next one and a follower reload: every page shows every event once, in order', { timeout: 120_000 }, async () => {
  const n = 700;
  const feed = stream('five', n);
  const pages = [];
  for (let i = 0; i < 5; i++) pages.push(await newPage('/page.html?s=five.1'));
  feed.go();
  for (const page of pages) await waitFor(async () => (await count(page, 'five')) >= 40, 'events in every page');
  assert.equal(feed.connections, 1, 'one connection for five pages');
  assert.equal(feed.open, 1);

  const first = await leaderOf(pages, 'five');
  await waitFor(async () => (await stats(first, 'five')).followers === 4, 'the leader knows 4 followers');
  const follower = await stats(pages.find((p) => p !== first), 'five');
  assert.equal(follower.shared, true);
  assert.equal(follower.leader, false);
  assert.equal(follower.followers, null);
  assert.equal(follower.connects, 0, 'a follower opens no connection');
  for (const page of pages) assert.equal(await page.evaluate(() => globalThis.sources.five.readyState), 1, 'OPEN everywhere');

  // The leader closes mid-stream: another takes over from its own last event.
  await first.close();
  let open = pages.filter((p) => p !== first);
  const second = await leaderOf(open, 'five');
  assert.notEqual(second, first);
  await waitFor(async () => (await stats(second, 'five')).followers === 3, 'the new leader knows 3 followers');
  const at = await count(second, 'five');
  await waitFor(async () => (await count(second, 'five')) >= at + 60, 'the new leader delivers');

  // The new leader reloads mid-stream: a third takes over; the reloaded
  // page follows, from where it was.
  await second.reload();
  await until(second, () => globalThis.ready === true, undefined, 10_000);
  const third = await leaderOf(open, 'five');
  assert.notEqual(third, second);
  // And a follower reloads too.
  const reloaded = [second, open.find((p) => p !== second && p !== third)];
  await reloaded[1].reload();
  await until(reloaded[1], () => globalThis.ready === true, undefined, 10_000);

  for (const page of open) {
    await waitFor(async () => (await page.evaluate(() => globalThis.shown('five').length)) >= n, 'every event', 30_000).catch(async (e) => {
      for (const p of open) console.error(JSON.stringify(await p.evaluate(() => { const g = globalThis.got.five.map((d) => Number(d.split(':')[1])); const gaps = []; for (let i = 1; i < g.length; i++) if (g[i] !== g[i - 1] + 1) gaps.push([g[i - 1], g[i]]); return { shown: globalThis.shown('five').length, n: g.length, first: g[0], gaps, leader: globalThis.sources.five.stats().leader }; })));
      throw e;
    });
  }
  await new Promise((r) => setTimeout(r, 300)); // anything repeated would show up here
  for (const page of open.filter((p) => !reloaded.includes(p))) {
    assert.deepEqual(ids(await page.evaluate(() => globalThis.got.five)), range(1, n), 'a page that stayed open');
  }
  for (const page of reloaded) {
    assert.deepEqual(ids(await page.evaluate(() => globalThis.shown('five'))), range(1, n), 'a reloaded page, across its lives');
  }
  assert.equal(feed.connections, 3, 'one connection per leader');
  for (const page of open) await page.close();
});

test('a server that rewinds 30 events: a reloaded lone page, then each of two leaders reloading, show every event once, in order', { timeout: 120_000 }, async () => {
  // Each resuming connection gets the 30 events before its Last-Event-ID
  // again. A context that leads after a reload opened the stream from
  // IndexedDB with its window; one that took over had its own window too.
  const n = 900;
  const feed = stream('rewind', n, 30);
  const a = await newPage('/page.html?s=rewind.1');
  feed.go();
  const shownBy = (page) => page.evaluate(() => globalThis.shown('rewind').length);
  await waitFor(async () => (await shownBy(a)) >= 100, 'events in the lone page');
  await a.reload();
  await until(a, () => globalThis.ready === true, undefined, 10_000);
  await waitFor(async () => (await shownBy(a)) >= 250, 'events after the reload');
  assert.ok(feed.connections >= 2, 'the reloaded page connected itself');
  const b = await newPage('/page.html?s=rewind.1');
  await waitFor(async () => (await count(b, 'rewind')) >= 20, 'events in the second page');
  for (const page of [a, b]) {
    const leader = await leaderOf([a, b], 'rewind');
    await waitFor(async () => (await stats(leader, 'rewind')).followers === 1, 'the leader knows its follower');
    const at = await shownBy(leader);
    await waitFor(async () => (await shownBy(leader)) >= at + 100, 'the leader delivers');
    await leader.reload();
    await until(leader, () => globalThis.ready === true, undefined, 10_000);
    assert.notEqual(await leaderOf([a, b], 'rewind'), leader, 'the other page took over');
    void page;
  }
  for (const page of [a, b]) {
    await waitFor(async () => (await page.evaluate(() => globalThis.shown('rewind').at(-1))) === `rewind:${n}`, 'the last event', 30_000);
  }
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(ids(await a.evaluate(() => globalThis.shown('rewind'))), range(1, n), 'the first page, across its reloads');
  const second = ids(await b.evaluate(() => globalThis.shown('rewind')));
  assert.deepEqual(second, range(second[0], n), 'the second page, from where it joined');
  assert.ok(feed.connections >= 4, `connections: ${feed.connections}`);
  for (const page of [a, b]) await page.close();
});

test('the leading page crashes: the others go on, each event once, in order', { timeout: 60_000 }, async () => {
  const n = 400;
  const feed = stream('crash', n);
  const pages = [];
  for (let i = 0; i < 3; i++) pages.push(await newPage('/page.html?s=crash.1'));
  feed.go();
  for (const page of pages) await waitFor(async () => (await count(page, 'crash')) >= 100, 'events in every page');
  const leader = await leaderOf(pages, 'crash');
  const crashed = new Promise((r) => leader.once('crash', r));
  const cdp = await browser.context.newCDPSession(leader);
  cdp.send('Page.crash').catch(() => {}); // never answers: the renderer is gone
  await crashed;
  const open = pages.filter((p) => p !== leader);
  for (const page of open) await until(page, (last) => globalThis.got.crash.at(-1) === last, `crash:${n}`, 30_000);
  await new Promise((r) => setTimeout(r, 300));
  for (const page of open) assert.deepEqual(ids(await page.evaluate(() => globalThis.got.crash)), range(1, n));
  assert.equal(feed.connections, 2, 'the next leader took over');
  for (const page of pages) await page.close();
});

test('when the leader\'s stream stops for good, every page stops with it', { timeout: 60_000 }, async () => {
  const feed = stream('gone', 30);
  const pages = [await newPage('/page.html?s=gone.1'), await newPage('/page.html?s=gone.1')];
  feed.go();
  for (const page of pages) await until(page, () => globalThis.got.gone.length === 30);
  // The stream is gone: the leader's reconnect gets a 404.
  streams.delete('gone');
  for (const page of pages) await page.evaluate(() => globalThis.sources.gone.addEventListener('error', (e) => (globalThis.stopped = e.message)));
  const leader = await leaderOf(pages, 'gone');
  await leader.evaluate(() => globalThis.sources.gone.stats()); // the leader is known before the cut
  server.http.closeAllConnections();
  for (const page of pages) {
    await until(page, () => globalThis.sources.gone.readyState === 2);
    assert.match(await page.evaluate(() => globalThis.stopped), /404/);
  }
  assert.equal(feed.connections, 1);
  for (const page of pages) await page.close();
});

test('a dedicated worker shares the stream of a page, and takes it over', { timeout: 60_000 }, async () => {
  const n = 400;
  const feed = stream('worker', n);
  const page = await newPage('/page.html?s=worker.1');
  feed.go();
  await waitFor(async () => (await count(page, 'worker')) >= 20, 'the page leads');
  const host = await newPage('/worker-host.html?s=worker');
  await until(host, () => globalThis.fromWorker.length >= 20);
  assert.equal(feed.connections, 1, 'the worker follows the page');
  await host.evaluate(() => globalThis.worker.postMessage('stats'));
  await until(host, () => globalThis.workerStats !== undefined);
  assert.equal(await host.evaluate(() => globalThis.workerStats.leader), false);
  await page.close();
  await until(host, (last) => globalThis.fromWorker.at(-1) === last, `worker:${n}`, 30_000);
  await new Promise((r) => setTimeout(r, 300));
  const got = ids(await host.evaluate(() => globalThis.fromWorker));
  assert.deepEqual(got, range(got[0], n), 'the worker got each event once, in order, across the take-over');
  assert.equal(feed.connections, 2, 'the worker leads once the page is gone');
  await host.evaluate(() => globalThis.worker.postMessage('stats'));
  await until(host, () => globalThis.workerStats?.leader === true);
  await host.close();
});

test('eight tabs of a stream on an HTTP/1.1 origin: unshared, the browser lets six connect; shared, all eight get every event', { timeout: 90_000 }, async () => {
  const n = 300;
  const streamsOf = (name) => streams.get(name);
  // Unshared tabs of one key resume from each other's cursor: what tells
  // them apart is whether they connected at all.
  // The streams come from another origin, so that the pages themselves
  // still load while its six connections are taken.
  stream('six', n).go();
  const unshared = [];
  for (let i = 0; i < 8; i++) unshared.push(await newPage(`/page.html?s=six.0&base=${other.url}`));
  await waitFor(async () => streamsOf('six').open === 6, 'six connections');
  await new Promise((r) => setTimeout(r, 1000));
  const connects = await Promise.all(unshared.map(async (p) => (await stats(p, 'six')).connects));
  assert.equal(streamsOf('six').open, 6, 'the browser opens six connections per HTTP/1.1 host');
  assert.equal(connects.filter((c) => c === 0).length, 2, `two tabs never connect: ${connects}`);
  for (const page of unshared) await page.close();

  const feed = stream('eight', n);
  const shared = [];
  for (let i = 0; i < 8; i++) shared.push(await newPage(`/page.html?s=eight.1&base=${other.url}`));
  feed.go();
  for (const page of shared) await until(page, (last) => globalThis.got.eight.at(-1) === last, `eight:${n}`, 30_000);
  for (const page of shared) assert.deepEqual(ids(await page.evaluate(() => globalThis.got.eight)), range(1, n));
  // Leader and followers alike: messages come from the stream's origin,
  // not the page's.
  for (const page of shared) assert.deepEqual(await page.evaluate(() => [...globalThis.origins.eight]), [other.url]);
  assert.equal(feed.connections, 1);
  for (const page of shared) await page.close();
});

test('shared and unshared sources of different keys do not cross streams', { timeout: 60_000 }, async () => {
  const n = 150;
  const feeds = { a: stream('a', n), b: stream('b', n), c: stream('c', n) };
  const pages = [await newPage('/page.html?s=a.1,b.0,c.1'), await newPage('/page.html?s=c.1,a.1,b.0')];
  Object.values(feeds).forEach((f) => f.go());
  for (const page of pages) {
    for (const name of ['a', 'b', 'c']) {
      await waitFor(async () => (await count(page, name)) >= n, `${name} complete`);
      const got = await page.evaluate((x) => globalThis.got[x], name);
      assert.deepEqual(got, range(1, n).map((i) => `${name}:${i}`), `stream ${name} in one page`);
    }
  }
  assert.equal(feeds.a.connections, 1);
  assert.equal(feeds.c.connections, 1);
  assert.equal(feeds.b.connections, 2, 'unshared: one connection per page');
  assert.equal((await stats(pages[0], 'b')).shared, false);
  for (const page of pages) await page.close();
});

test('without Web Locks each context has its own connection, warned once, and says so in stats()', { timeout: 60_000 }, async () => {
  const n = 50;
  const feeds = { d: stream('d', n), e: stream('e', n) };
  const page = await browser.context.newPage();
  const warnings = [];
  page.on('console', (m) => m.type() === 'warning' && warnings.push(m.text()));
  await page.addInitScript(() => delete Navigator.prototype.locks);
  await page.goto(`${server.url}/page.html?s=d.1,e.1`);
  await until(page, () => globalThis.ready === true);
  Object.values(feeds).forEach((f) => f.go());
  for (const name of ['d', 'e']) await waitFor(async () => (await count(page, name)) >= n, `${name} complete`);
  const s = await stats(page, 'd');
  assert.equal(s.shared, false);
  assert.equal(s.leader, false);
  assert.match(s.sharingWarning, /Web Locks/);
  assert.equal(warnings.filter((w) => w.includes('shared streams')).length, 1, `one warning: ${warnings}`);
  assert.equal(feeds.d.connections, 1);
  assert.deepEqual(ids(await page.evaluate(() => globalThis.got.e)), range(1, n));
  await page.close();
});
