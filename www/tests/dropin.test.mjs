// `ResumableEventSource` as a drop-in `EventSource`, in real Chromium: a page
// on one origin (a Node server on 127.0.0.1, port 0) reads streams of a
// second origin (another server on another port) that answers, like many
// servers in front of an `EventSource`, with `Access-Control-Allow-Origin`
// only: no preflight allowed. Also the origin of messages after a redirect,
// the server's `retry:`, the `fetch` option, and the `code` of error events.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { launchBrowser, listen, servePackage, until } from './harness.mjs';

const PAGE = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tidemark drop-in test</title>
<script type="module">
  import * as tm from '/tidemark/index.js';
  globalThis.tm = tm;
  globalThis.ready = true;
</script></head><body><p>tidemark drop-in test</p></body></html>`;

/**
 * A server on its own port. `route(path, handler)` scripts an endpoint
 * (`handler(req, res, n)`, `n` the request's number on that path);
 * `requests(path)` lists every request to it, preflights included, with
 * its method, headers, query and arrival time. With `cors`, every answer
 * carries `Access-Control-Allow-Origin: *` and nothing else of CORS: a
 * preflight gets a 405.
 */
async function startOrigin({ cors }) {
  const routes = new Map();
  const log = new Map();
  const server = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    const records = log.get(url.pathname) ?? [];
    log.set(url.pathname, records);
    records.push({ method: req.method, headers: req.headers, query: url.searchParams, at: Date.now() });
    if (cors) res.setHeader('access-control-allow-origin', '*');
    try {
      if (url.pathname === '/page.html') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
        return res.end(PAGE);
      }
      if (await servePackage(url.pathname, res)) return;
      const handler = routes.get(url.pathname);
      if (req.method === 'OPTIONS' && !handler?.preflight) {
        res.writeHead(405, { 'content-type': 'text/plain' });
        return res.end('no preflight here');
      }
      if (!handler) {
        res.writeHead(404, { 'content-type': 'text/plain' });
        return res.end('no such route');
      }
      handler(req, res, records.filter((r) => r.method !== 'OPTIONS').length, url);
    } catch (error) {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(String(error));
    }
  });
  const port = await listen(server);
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

function open(res, retry) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  if (retry !== undefined) res.write(`retry: ${retry}\n\n`);
}

function sendRange(res, from, to) {
  for (let id = from; id <= to; id++) res.write(`id: ${id}\ndata: event ${id}\n\n`);
}

/** Events 1..`each * cuts`: `each` per connection, then the server ends the response. */
function cutEvery(each) {
  return (req, res, n, url) => {
    const cursor = req.headers['last-event-id'] ?? url.searchParams.get('lastEventID') ?? url.searchParams.get('cursor');
    const after = Number(cursor) || 0;
    open(res);
    sendRange(res, after + 1, after + each);
    setTimeout(() => res.end(), 50);
  };
}

async function waitFor(predicate, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

let browser;
let home;
let other;
before(async () => {
  home = await startOrigin({ cors: false });
  other = await startOrigin({ cors: true });
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  await home?.stop();
  await other?.stop();
});

async function newPage() {
  const page = await browser.context.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(`${home.url}/page.html`);
  await until(page, () => globalThis.ready === true, undefined, 10_000);
  return page;
}

/**
 * Opens a source in the page as `globalThis[name]`, recording what it
 * hears. `options` is an object, or the source text of one (for functions).
 */
async function openSource(page, name, url, options = {}) {
  await page.evaluate(
    ({ name, url, options }) => {
      const got = [];
      const errors = [];
      const given = typeof options === 'string' ? (0, eval)(`(${options})`) : options;
      const source = new tm.ResumableEventSource(url, { store: 'memory', ...given });
      source.onmessage = (e) => got.push({ id: e.lastEventId, data: e.data, origin: e.origin });
      source.onerror = (e) =>
        errors.push({
          readyState: source.readyState,
          message: e.message ?? null,
          code: e.code ?? null,
          willReconnect: e.willReconnect,
          retryDelay: e.retryDelay ?? null,
        });
      globalThis[name] = { source, got, errors };
    },
    { name, url, options },
  );
}

const ids = (page, name) => page.evaluate((n) => globalThis[n].got.map((e) => Number(e.id)), name);

test('a cross-origin stream that allows only the origin: no preflight, and a resume through lastEventIdParam', { timeout: 60_000 }, async () => {
  other.route('/cors/plain', cutEvery(3));
  other.route('/cors/mercure', cutEvery(3));
  const page = await newPage();
  try {
    // The header way: the first connect needs no preflight, but the resume
    // sends Last-Event-ID, which this server's missing preflight refuses.
    await openSource(page, 'plain', `${other.url}/cors/plain`, { reconnect: { initialDelay: 50, maxDelay: 100, maxAttempts: 3 } });
    // The query way: every connect is a simple request.
    await openSource(page, 'mercure', `${other.url}/cors/mercure`, {
      lastEventIdParam: true,
      reconnect: { initialDelay: 50, maxDelay: 100 },
    });
    await until(page, () => mercure.got.length >= 12, undefined, 20_000);
    await until(page, () => plain.source.readyState === 2, undefined, 20_000);

    const first = other.requests('/cors/plain')[0];
    assert.equal(first.method, 'GET', 'the first connect is not preceded by a preflight');
    assert.equal(first.headers.accept, 'text/event-stream');
    assert.equal(first.headers['last-event-id'], undefined);
    // (Chromium itself adds Cache-Control and Pragma for cache: 'no-store';
    // headers the browser adds never need a preflight.)
    assert.deepEqual(await ids(page, 'plain'), [1, 2, 3], 'the first connection delivered');
    const preflights = other.requests('/cors/plain').filter((r) => r.method === 'OPTIONS');
    assert.ok(preflights.length >= 1, 'a resume with Last-Event-ID needs a preflight');
    assert.equal(preflights[0].headers['access-control-request-headers'], 'last-event-id');
    const plainErrors = await page.evaluate(() => plain.errors);
    assert.equal(plainErrors.at(-1).readyState, 2, 'refused resumes end the stream after maxAttempts');

    const requests = other.requests('/cors/mercure');
    assert.ok(requests.every((r) => r.method === 'GET'), `no preflight at all: ${requests.map((r) => r.method)}`);
    assert.ok(requests.every((r) => r.headers['last-event-id'] === undefined), 'no Last-Event-ID header');
    assert.equal(requests[0].query.get('lastEventID'), null, 'a first connect has no cursor');
    assert.equal(requests[1].query.get('lastEventID'), '3', 'the resume carries the cursor in the URL');
    const got = await ids(page, 'mercure');
    assert.deepEqual(got.slice(0, 12), Array.from({ length: 12 }, (_, i) => i + 1), 'every event once, in order');
  } finally {
    await page.close();
  }
});

test('lastEventIdParam with a name of its own replaces a parameter of that name', { timeout: 30_000 }, async () => {
  other.route('/cors/named', cutEvery(2));
  const page = await newPage();
  try {
    await openSource(page, 'named', `${other.url}/cors/named?topic=a&cursor=old`, {
      lastEventIdParam: 'cursor',
      reconnect: { initialDelay: 50, maxDelay: 100 },
    });
    await until(page, () => named.got.length >= 6, undefined, 20_000);
    const requests = other.requests('/cors/named');
    assert.equal(requests[0].query.get('cursor'), 'old', 'the URL as given first');
    assert.deepEqual([...requests[1].query.entries()], [['topic', 'a'], ['cursor', '2']]);
    assert.deepEqual((await ids(page, 'named')).slice(0, 6), [1, 2, 3, 4, 5, 6]);
  } finally {
    await page.close();
  }
});

test('a cross-origin resume with Last-Event-ID works where the server allows the header', { timeout: 30_000 }, async () => {
  const stream = cutEvery(2);
  const allowing = (req, res, n, url) => {
    if (req.method === 'OPTIONS') {
      res.writeHead(204, { 'access-control-allow-headers': 'last-event-id', 'access-control-max-age': '0' });
      return res.end();
    }
    stream(req, res, n, url);
  };
  allowing.preflight = true;
  other.route('/cors/allowing', allowing);
  const page = await newPage();
  try {
    await openSource(page, 'allowing', `${other.url}/cors/allowing`, { reconnect: { initialDelay: 50, maxDelay: 100 } });
    await until(page, () => allowing.got.length >= 6, undefined, 20_000);
    const requests = other.requests('/cors/allowing');
    const gets = requests.filter((r) => r.method === 'GET');
    assert.equal(requests[0].method, 'GET', 'no preflight before the first connect');
    assert.equal(requests[1].method, 'OPTIONS', 'a preflight before the resume');
    assert.equal(gets[1].headers['last-event-id'], '2');
    assert.deepEqual((await ids(page, 'allowing')).slice(0, 6), [1, 2, 3, 4, 5, 6]);
  } finally {
    await page.close();
  }
});

test('event.origin is the origin of the final URL after a redirect', { timeout: 30_000 }, async () => {
  other.route('/origin/stream', (req, res) => {
    open(res);
    sendRange(res, 1, 2);
  });
  home.route('/origin/redirect', (req, res) => {
    res.writeHead(307, { location: `${other.url}/origin/stream` });
    res.end();
  });
  home.route('/origin/same', (req, res) => {
    open(res);
    sendRange(res, 1, 1);
  });
  const page = await newPage();
  try {
    await openSource(page, 'redirected', `${home.url}/origin/redirect`);
    await openSource(page, 'same', '/origin/same');
    await until(page, () => redirected.got.length >= 2 && same.got.length >= 1, undefined, 10_000);
    const got = await page.evaluate(() => ({ redirected: redirected.got, same: same.got }));
    assert.deepEqual(got.redirected.map((e) => e.origin), [other.url, other.url], 'the origin the stream came from');
    assert.equal(got.same[0].origin, home.url);
    assert.equal(home.requests('/origin/redirect').length, 1);
  } finally {
    await page.close();
  }
});

test("the server's retry: is the reconnect delay, below the default first backoff, doubling over failures in a row", { timeout: 30_000 }, async () => {
  const ends = [];
  home.route('/retry/short', (req, res, n) => {
    if (n === 1) {
      open(res, 100);
      sendRange(res, 1, 2);
      setTimeout(() => {
        ends.push(Date.now());
        res.end();
      }, 100);
    } else if (n <= 4) {
      ends.push(Date.now());
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end('not now');
    } else {
      open(res);
      sendRange(res, 3, 3);
    }
  });
  home.route('/retry/tiny', (req, res, n) => {
    open(res, n === 1 ? 1 : undefined);
    sendRange(res, n, n);
    setTimeout(() => {
      ends.push(Date.now());
      res.end();
    }, 20);
  });
  const page = await newPage();
  try {
    // Default reconnect options: a first backoff of 250 ms.
    await openSource(page, 'short', '/retry/short');
    await until(page, () => short.got.length >= 3, undefined, 20_000).catch(async (e) => {
      console.error('short:', JSON.stringify(await page.evaluate(() => ({ got: short.got, errors: short.errors }))), home.requests('/retry/short').length);
      throw e;
    });
    const at = home.requests('/retry/short').map((r) => r.at);
    const gaps = at.slice(1, 5).map((t, i) => t - ends[i]);
    // retry 100 (+ up to 50 jitter), then 200, 400, 800 (+ up to half).
    assert.ok(gaps[0] >= 95 && gaps[0] < 240, `the reconnect after data waits the server's 100 ms, not 250: ${gaps}`);
    assert.ok(gaps[1] >= 190 && gaps[1] < 450, `then doubles: ${gaps}`);
    assert.ok(gaps[2] >= 380 && gaps[2] < 800, `and doubles: ${gaps}`);
    assert.ok(gaps[3] >= 760, `and doubles: ${gaps}`);
    assert.deepEqual(await ids(page, 'short'), [1, 2, 3]);
    const errors = await page.evaluate(() => short.errors);
    assert.deepEqual(errors.map((e) => e.code), [null, 500, 500, 500], 'each error says its status');
    assert.ok(errors.every((e) => e.willReconnect === true && e.readyState === 0));

    ends.length = 0;
    await openSource(page, 'tiny', '/retry/tiny');
    await until(page, () => tiny.got.length >= 2, undefined, 10_000);
    await page.evaluate(() => tiny.source.close());
    const tinyAt = home.requests('/retry/tiny').map((r) => r.at);
    const tinyGap = tinyAt[1] - ends[0];
    assert.ok(tinyGap >= 45, `retry: 1 counts as the 50 ms lower bound: ${tinyGap}`);
    assert.ok(tinyGap < 240, `and is still below the default first backoff: ${tinyGap}`);
  } finally {
    await page.close();
  }
});

test('the fetch option: every request goes through it, and a Response without a streaming body is a clear error', { timeout: 30_000 }, async () => {
  home.route('/fetch/stream', (req, res, n) => {
    open(res);
    const after = Number(req.headers['last-event-id'] ?? 0);
    sendRange(res, after + 1, after + 2);
    if (n < 3) setTimeout(() => res.end(), 50);
  });
  const page = await newPage();
  try {
    await page.evaluate(() => {
      globalThis.calls = [];
      const fetch = (input, init) => {
        calls.push({ url: input, method: init.method, headers: { ...init.headers }, cache: init.cache, hasSignal: init.signal instanceof AbortSignal });
        return globalThis.fetch(input, { ...init, headers: { ...init.headers, 'x-token': `t${calls.length}` } });
      };
      const got = [];
      const source = new tm.ResumableEventSource('/fetch/stream', { store: 'memory', fetch, reconnect: { initialDelay: 50 } });
      source.onmessage = (e) => got.push(Number(e.lastEventId));
      globalThis.wrapped = { source, got };
    });
    await until(page, () => wrapped.got.length >= 6, undefined, 10_000);
    const calls = await page.evaluate(() => calls);
    assert.equal(calls.length, 3, 'one call per connect');
    assert.deepEqual(calls.map((c) => c.url), Array(3).fill(`${home.url}/fetch/stream`));
    assert.deepEqual(calls[0].headers, { Accept: 'text/event-stream' }, 'headers as a plain object');
    assert.equal(calls[1].headers['Last-Event-ID'], '2');
    assert.ok(calls.every((c) => c.method === 'GET' && c.cache === 'no-store' && c.hasSignal));
    assert.deepEqual(
      home.requests('/fetch/stream').map((r) => r.headers['x-token']),
      ['t1', 't2', 't3'],
      'the server got what the page\'s fetch added',
    );
    assert.deepEqual(await page.evaluate(() => wrapped.got), [1, 2, 3, 4, 5, 6]);

    // A Response made in the page: its body streams, so it works; its
    // origin is the one asked for.
    await openSource(page, 'synthetic', '/nowhere', `{
      fetch: async () => new Response('id: 1\\ndata: made here\\n\\n', { headers: { 'content-type': 'text/event-stream' } }),
    }`);
    // No body, or not a Response at all: a clear error, and no retry.
    let nulls = 0;
    await page.exposeFunction('countNull', () => ++nulls);
    await openSource(page, 'nobody', '/nowhere/1', `{
      fetch: async () => {
        await globalThis.countNull();
        return new Response(null, { headers: { 'content-type': 'text/event-stream' } });
      },
    }`);
    await openSource(page, 'notresponse', '/nowhere/2', '{ fetch: async () => ({ status: 200 }) }');
    await until(page, () => synthetic.got.length === 1 && nobody.source.readyState === 2 && notresponse.source.readyState === 2, undefined, 10_000);
    const got = await page.evaluate(() => ({ synthetic: synthetic.got, nobody: nobody.errors, notresponse: notresponse.errors }));
    assert.deepEqual(got.synthetic, [{ id: '1', data: 'made here', origin: home.url }]);
    assert.equal(got.nobody.length, 1);
    assert.match(got.nobody[0].message, /no streaming body/);
    assert.equal(got.nobody[0].willReconnect, false);
    assert.equal(nulls, 1, 'not retried');
    assert.match(got.notresponse[0].message, /not a Response/);
    assert.equal(got.notresponse[0].readyState, 2);
  } finally {
    await page.close();
  }
});

test('error events carry the HTTP status as code, and whether the source reconnects', { timeout: 30_000 }, async () => {
  home.route('/codes/busy', (req, res, n) => {
    if (n === 1) {
      res.writeHead(503, { 'content-type': 'text/plain' });
      return res.end('busy');
    }
    open(res);
    sendRange(res, 1, 1);
  });
  home.route('/codes/gone', (req, res) => {
    res.writeHead(410, { 'content-type': 'text/plain' });
    res.end('gone');
  });
  const page = await newPage();
  try {
    await openSource(page, 'busy', '/codes/busy', { reconnect: { initialDelay: 50 } });
    await openSource(page, 'gone', '/codes/gone');
    // Nothing listens on port 9 of loopback: a network error, no status.
    await openSource(page, 'refused', 'http://127.0.0.1:9/events', { reconnect: { initialDelay: 50, maxAttempts: 2 } });
    await until(page, () => busy.got.length === 1 && gone.source.readyState === 2 && refused.source.readyState === 2, undefined, 20_000);
    const errors = await page.evaluate(() => ({ busy: busy.errors, gone: gone.errors, refused: refused.errors }));
    assert.equal(errors.busy.length, 1);
    assert.equal(errors.busy[0].code, 503);
    assert.equal(errors.busy[0].willReconnect, true);
    assert.equal(errors.busy[0].readyState, 0);
    assert.match(errors.busy[0].message, /503/);
    assert.deepEqual(errors.gone.map((e) => [e.code, e.willReconnect, e.readyState]), [[410, false, 2]]);
    assert.match(errors.gone[0].message, /410/);
    assert.ok(errors.refused.length >= 2, JSON.stringify(errors.refused));
    assert.ok(errors.refused.every((e) => e.code === null), 'a network error has no code');
    assert.deepEqual(errors.refused.map((e) => e.willReconnect), [true, false]);
  } finally {
    await page.close();
  }
});
