// `tidemark proxy` in front of an upstream that never replays, for the
// browser's own EventSource (issue 14): a plain page (no tidemark code)
// opens `new EventSource('/feed')`; between the page and the proxy a chaos
// relay cuts every stream connection after a random few bytes or
// milliseconds, again and again, and the page is reloaded mid-stream.
//
// What this proves: within one page life, across every cut, the page gets
// every upstream event from the first it received to the last exactly once
// and in order, with no gap signal; the proxy followed the upstream with
// one connection for the whole run (the upstream never replays, so any
// reconnection upstream would lose events). A reloaded page's new
// EventSource has no Last-Event-ID (a browser cannot set it on a fresh
// EventSource), so it starts live: across lives, ids only increase.
//
// The same relay and page against `tidemark serve` (which replays) check
// the harness itself. PROXY_TEST_DEBUG=1 prints the proxy's stderr.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { launchBrowser, listen, startChaosRelay, startTidemark } from './harness.mjs';

/** The page: the browser's EventSource and nothing else; every message,
 * gap signal, error and open is reported to the test with the page life it
 * belongs to (a reload starts a new life). */
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>plain EventSource</title>
<script>
  const life = String(performance.timeOrigin) + '-' + Math.random();
  const feed = new URLSearchParams(location.search).get('feed') || '/feed';
  const source = new EventSource(feed);
  const report = (what) => globalThis.report({ life, ...what });
  source.onopen = () => report({ kind: 'open' });
  source.onmessage = (e) => report({ kind: 'message', data: e.data, id: e.lastEventId });
  source.addEventListener('tidemark-gap', (e) => report({ kind: 'gap', data: e.data, id: e.lastEventId }));
  source.onerror = () => report({ kind: 'error', state: source.readyState });
</script>
`;

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
});

/**
 * The upstream that never replays: `/page.html` is the page; `/feed` is
 * one global sequence (id and data 1, 2, 3, ... every `intervalMs`), sent
 * to each connection from the moment it opens, whatever its Last-Event-ID.
 */
async function startUpstream(intervalMs) {
  const feeds = new Set();
  const upstream = { connections: 0, last: 0 };
  const server = http.createServer((req, res) => {
    const path = new URL(req.url, 'http://upstream').pathname;
    if (path === '/page.html') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(PAGE);
    } else if (path === '/feed') {
      upstream.connections++;
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      res.write(': upstream never replays\n\n');
      feeds.add(res);
      req.on('close', () => feeds.delete(res));
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('no\n');
    }
  });
  const timer = setInterval(() => {
    upstream.last++;
    const frame = `id: ${upstream.last}\ndata: ${upstream.last}\n\n`;
    for (const res of feeds) res.write(frame);
  }, intervalMs);
  const port = await listen(server);
  upstream.url = `http://127.0.0.1:${port}`;
  upstream.stop = async () => {
    clearInterval(timer);
    for (const res of feeds) res.destroy();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  };
  return upstream;
}

/**
 * The relay cuts every connection that carries a GET of `path` after a
 * random number of bytes towards the page (response head included) or a
 * random time, whichever comes first; the page itself is relayed untouched.
 */
const streamRequest = (path) => (request) => request.method === 'GET' && request.path.startsWith(path);

/**
 * Opens `url` in a new page and records what every life of it reports:
 * `lives` is a list of `{ life, messages, gaps, errors, closed }` in the
 * order the lives began; `changed` wakes waiters on every report.
 */
async function watchPage(url) {
  const page = await browser.context.newPage();
  const record = { lives: [], waiters: new Set() };
  const lifeOf = (life) => {
    let entry = record.lives.find((l) => l.life === life);
    if (!entry) {
      entry = { life, messages: [], gaps: [], errors: 0, opens: 0, closed: false };
      record.lives.push(entry);
    }
    return entry;
  };
  await page.exposeFunction('report', (what) => {
    const entry = lifeOf(what.life);
    if (what.kind === 'message') entry.messages.push({ data: what.data, id: what.id });
    if (what.kind === 'gap') entry.gaps.push({ data: what.data, id: what.id });
    if (what.kind === 'open') entry.opens++;
    if (what.kind === 'error') {
      entry.errors++;
      if (what.state === 2) entry.closed = true;
    }
    for (const wake of record.waiters) wake();
  });
  record.page = page;
  /** Resolves when `predicate(lives)` holds; fails after `ms`. */
  record.until = (predicate, what, ms = 30_000) =>
    new Promise((resolve, reject) => {
      const check = () => {
        if (predicate(record.lives)) {
          clearTimeout(timer);
          record.waiters.delete(check);
          resolve();
        }
      };
      const timer = setTimeout(() => {
        record.waiters.delete(check);
        reject(new Error(`timed out waiting for ${what}: ${summary(record.lives)}`));
      }, ms);
      record.waiters.add(check);
      check();
    });
  await page.goto(url);
  return record;
}

const summary = (lives) =>
  JSON.stringify(
    lives.map((l) => ({
      messages: l.messages.length,
      first: l.messages[0]?.data,
      last: l.messages.at(-1)?.data,
      gaps: l.gaps.length,
      errors: l.errors,
      opens: l.opens,
      closed: l.closed,
    })),
  );

/**
 * Within one life: the data (upstream ids) run consecutively from the
 * first received to the last (every event exactly once, in order), the
 * ids as `idOf` maps them; no gap signal; the EventSource never gave up.
 */
function checkLife(entry, index, idOf) {
  const where = `life ${index}`;
  assert.equal(entry.closed, false, `${where}: the EventSource closed for good`);
  assert.deepEqual(entry.gaps, [], `${where}: gap signals`);
  const data = entry.messages.map((m) => Number(m.data));
  const first = data[0];
  const out = data.flatMap((d, i) => (d === first + i ? [] : [`#${i}: ${d} (expected ${first + i})`]));
  assert.deepEqual(out.slice(0, 10), [], `${where}: not every event once and in order: ${data.join(',')}`);
  for (const m of entry.messages) idOf(m, where);
}

test('EventSource through a chaos relay and tidemark proxy, reloaded: every event once, in order', { timeout: 120_000 }, async () => {
  const seed = Number(process.env.PROXY_TEST_SEED ?? Date.now() % 1_000_000);
  const upstream = await startUpstream(15);
  const proxy = await startTidemark([
    'proxy', '--upstream', upstream.url, '--listen', '127.0.0.1:0',
    '--retry-ms', '50', '--keep-alive-secs', '1',
  ]);
  const relay = await startChaosRelay(proxy.address, { seed, cuts: streamRequest('/feed') });
  try {
    const watched = await watchPage(`${relay.url}/page.html`);
    const lives = 4;
    const perLife = { messages: 60, errors: 6 };
    for (let i = 0; i < lives; i++) {
      await watched.until(
        (all) => all.length === i + 1 && all[i].messages.length >= perLife.messages && all[i].errors >= perLife.errors,
        `life ${i}: ${perLife.messages} events across ${perLife.errors} cuts (seed ${seed})`,
      );
      if (i < lives - 1) await watched.page.reload();
    }
    await watched.page.close();

    let token;
    let offset;
    let previous = 0;
    watched.lives.forEach((entry, index) => {
      checkLife(entry, index, (m, where) => {
        const match = /^([0-9a-f]{32})-(\d+)$/.exec(m.id);
        assert.ok(match, `${where}: ${m.id} is not a proxy id`);
        token ??= match[1];
        assert.equal(match[1], token, `${where}: one stream for the whole run`);
        // The proxy numbers the events it logged; one upstream connection
        // means one constant offset to the upstream's ids, in every life.
        offset ??= Number(match[2]) - Number(m.data);
        assert.equal(Number(match[2]) - Number(m.data), offset, `${where}: ${m.id} carries ${m.data}`);
      });
      const data = entry.messages.map((m) => Number(m.data));
      assert.ok(data[0] > previous, `life ${index} starts at ${data[0]}, after ${previous}: ids only increase`);
      previous = data.at(-1);
    });
    assert.equal(upstream.connections, 1, 'the proxy followed the upstream with one connection');
    assert.ok(relay.cuts >= lives * perLife.errors, `only ${relay.cuts} cuts`);
  } finally {
    await relay.stop();
    await proxy.stop();
    await upstream.stop();
  }
});

test('the chaos relay and the page against tidemark serve (which replays): every event once, in order', { timeout: 60_000 }, async () => {
  // The harness's own check: the same relay and page, no proxy, a server
  // that replays after Last-Event-ID. A failure here is the harness's.
  const seed = Number(process.env.PROXY_TEST_SEED ?? Date.now() % 1_000_000);
  const www = await mkdtemp(join(tmpdir(), 'tidemark-proxy-page-'));
  await writeFile(join(www, 'page.html'), PAGE);
  const server = await startTidemark([
    'serve', '--listen', '127.0.0.1:0', '--www', www, '--interval-ms', '15', '--retry-ms', '50',
  ]);
  const relay = await startChaosRelay(server.address, { seed, cuts: streamRequest('/events') });
  try {
    const watched = await watchPage(`${relay.url}/page.html?feed=/events`);
    await watched.until(
      (all) => all[0]?.messages.length >= 100 && all[0].errors >= 8,
      `100 events across 8 cuts (seed ${seed})`,
    );
    await watched.page.close();
    assert.equal(watched.lives.length, 1);
    checkLife(watched.lives[0], 0, (m, where) => assert.equal(m.id, m.data, `${where}: serve's ids are its data`));
    assert.equal(watched.lives[0].messages[0].data, '1', 'serve replays from the start');
  } finally {
    await relay.stop();
    await server.stop();
    await rm(www, { recursive: true, force: true });
  }
});
