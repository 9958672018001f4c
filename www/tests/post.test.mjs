// POST streams that survive a reload (issue 16), in real Chromium: a page
// POSTs a prompt with `new ResumableEventSource(url, { method: 'POST', ... })`
// and shows the answer, streamed by a Node upstream as 3,000 tokens without
// ids. Behind `tidemark proxy` (same origin: the upstream also serves the
// page and the package, which the proxy passes through) the answer carries
// a Content-Location; the page is reloaded twice mid-answer and must show
// the whole answer exactly once, in order, with one POST upstream, ending
// with a `close` event. Straight at the upstream (no proxy) the answer
// arrives whole and ends with `close`, but cannot be resumed; a cut there
// ends the stream with an error and no second POST.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { launchBrowser, listen, servePackage, startTidemark, until } from './harness.mjs';

const TOKENS = 3000;
const PROMPT = JSON.stringify({ prompt: 'tell me everything' });

/**
 * The page: one POST stream, started on load (and on every reload, with
 * the same streamKey). Every token it shows is appended to sessionStorage
 * (synchronous, kept across reloads of the tab) and counted for the test;
 * `close` and `error` are reported with the readyState and stats.
 * `?bytes` sends the body as a Uint8Array view with an offset.
 */
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>tidemark POST stream</title>
<script type="module">
  import * as tm from '/tidemark/index.js';
  globalThis.tm = tm;
  const q = new URLSearchParams(location.search);
  const prompt = ${JSON.stringify(PROMPT)};
  let body = prompt;
  if (q.has('bytes')) {
    const bytes = new TextEncoder().encode('xx' + prompt);
    body = new Uint8Array(bytes.buffer, 2);
  }
  const answer = new tm.ResumableEventSource(q.get('path'), {
    method: 'POST',
    body,
    headers: { 'content-type': 'application/json' },
    streamKey: q.get('key'),
    reconnect: { initialDelay: 50, maxDelay: 200 },
  });
  globalThis.answer = answer;
  const report = (what) => globalThis.report({ ...what, readyState: answer.readyState });
  answer.onmessage = (e) => {
    const shown = sessionStorage.getItem('shown');
    sessionStorage.setItem('shown', shown ? shown + ',' + e.data : e.data);
    report({ kind: 'message' });
  };
  answer.onclose = (e) => report({ kind: 'close', type: e.type, stats: answer.stats() });
  answer.onerror = (e) => report({ kind: 'error', message: e.message ?? null, stats: answer.stats() });
</script>`;


/**
 * The upstream: the page, the package, and two POST endpoints that answer
 * with an SSE stream of tokens `t1`, `t2`, ... (no ids): `/v1/chat` streams
 * all 3,000 (one every 2 ms) and ends; `/v1/cut` streams 50 and then cuts
 * the connection; `/v1/slow` answers after 10.5 s with 20 and ends. Every
 * POST is recorded with its body.
 */
async function startUpstream() {
  const upstream = { posts: [], live: new Set() };
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, 'http://upstream').pathname;
    if (path === '/page.html') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      return res.end(PAGE);
    }
    if (await servePackage(path, res)) return;
    if (req.method === 'POST' && ['/v1/chat', '/v1/cut', '/v1/slow'].includes(path)) {
      const chunks = [];
      for await (const chunk of req) chunks.push(chunk);
      upstream.posts.push({ path, body: Buffer.concat(chunks).toString('utf8'), type: req.headers['content-type'] });
      // A service that thinks before it answers: past the 10 s connect
      // timeout of GET streams.
      if (path === '/v1/slow') await new Promise((r) => setTimeout(r, 10_500));
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      const last = { '/v1/chat': TOKENS, '/v1/cut': 50, '/v1/slow': 20 }[path];
      let next = 1;
      const timer = setInterval(() => {
        // Two or three tokens per 5 ms tick: about 2 ms a token.
        for (let i = 0; i < 2 + (next % 2) && next <= last; i++, next++) res.write(`data: t${next}\n\n`);
        if (next > last) {
          clearInterval(timer);
          upstream.live.delete(timer);
          if (path !== '/v1/cut') res.end();
          // Once the last tokens are surely out: a cut, not a clean end.
          else setTimeout(() => res.socket.destroy(), 100);
        }
      }, 5);
      upstream.live.add(timer);
      req.on('close', () => {
        clearInterval(timer);
        upstream.live.delete(timer);
      });
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('no\n');
  });
  const port = await listen(server);
  upstream.url = `http://127.0.0.1:${port}`;
  upstream.stop = async () => {
    for (const timer of upstream.live) clearInterval(timer);
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  };
  return upstream;
}

let browser;
let upstream;
before(async () => {
  browser = await launchBrowser();
  upstream = await startUpstream();
});
after(async () => {
  await upstream?.stop();
  await browser?.close();
});

/** Opens the page at `base` and records what each of its lives reports. */
async function openPage(base, query) {
  const page = await browser.context.newPage();
  const record = { messages: 0, reports: [] };
  await page.exposeFunction('report', (what) => {
    if (what.kind === 'message') record.messages++;
    else record.reports.push(what);
  });
  await page.goto(`${base}/page.html?${new URLSearchParams(query)}`);
  record.page = page;
  record.shown = async () => {
    const shown = await page.evaluate(() => sessionStorage.getItem('shown') ?? '');
    return shown.split(',').filter(Boolean);
  };
  return record;
}

const whole = Array.from({ length: TOKENS }, (_, i) => `t${i + 1}`);

/** Waits, polling the test's own record, until `predicate()` holds. */
async function waitFor(predicate, what, ms = 60_000) {
  const end = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('behind the proxy a POST answer survives two reloads: shown once, in order, one POST, then close', { timeout: 120_000 }, async () => {
  const proxy = await startTidemark(['proxy', '--upstream', upstream.url, '--listen', '127.0.0.1:0']);
  const postsBefore = upstream.posts.length;
  try {
    const page = await openPage(proxy.url, { path: '/v1/chat', key: 'answer-m1' });
    for (const at of [700, 1700]) {
      await waitFor(() => page.messages >= at, `${at} tokens`);
      assert.ok(page.messages < TOKENS, 'the reload is mid-answer');
      await page.page.reload();
    }
    await waitFor(() => page.reports.some((r) => r.kind === 'close'), 'the close event');
    // Anything repeated or any error after the end would show up here.
    await page.page.waitForTimeout(300);
    const shown = await page.shown();
    assert.equal(shown.length, TOKENS, 'every token once');
    assert.deepEqual(shown, whole, 'in order');
    assert.equal(upstream.posts.length - postsBefore, 1, 'one POST upstream, whatever the reloads');
    const post = upstream.posts.at(-1);
    assert.deepEqual([post.body, post.type], [PROMPT, 'application/json']);
    const close = page.reports.find((r) => r.kind === 'close');
    assert.equal(close.type, 'close');
    assert.equal(close.readyState, 2);
    assert.equal(close.stats.method, 'POST');
    assert.equal(close.stats.resumable, true);
    assert.match(close.stats.resumeUrl, new RegExp(`^${proxy.url}/_tidemark/streams/`));
    const after = page.reports.slice(page.reports.indexOf(close));
    assert.deepEqual(after.filter((r) => r.kind === 'error'), [], 'no error after close');
    // The last life resumed: it did not start the answer over.
    assert.ok(close.stats.connects >= 1);

    // A later page with the same key never POSTs again: the stream is done.
    const again = await openPage(proxy.url, { path: '/v1/chat', key: 'answer-m1' });
    await waitFor(() => again.reports.length > 0, 'the second page to end');
    assert.deepEqual(again.reports.map((r) => r.kind), ['close']);
    assert.equal(upstream.posts.length - postsBefore, 1, 'still one POST');
    // forgetStream drops the record; the key would POST anew.
    await again.page.evaluate(() => globalThis.tm.forgetStream('answer-m1'));
    await again.page.close();
    await page.page.close();
  } finally {
    await proxy.stop();
  }
});

test('without the proxy the answer arrives whole and ends with close, not resumable', { timeout: 60_000 }, async () => {
  const postsBefore = upstream.posts.length;
  const page = await openPage(upstream.url, { path: '/v1/chat', key: 'answer-m2', bytes: '' });
  await waitFor(() => page.reports.some((r) => r.kind === 'close'), 'the close event');
  await page.page.waitForTimeout(200);
  assert.deepEqual(await page.shown(), whole);
  assert.deepEqual(page.reports.map((r) => r.kind), ['close'], 'no error');
  const close = page.reports[0];
  assert.equal(close.readyState, 2);
  assert.equal(close.stats.resumable, false);
  assert.equal(close.stats.resumeUrl, null);
  assert.equal(upstream.posts.length - postsBefore, 1);
  assert.equal(upstream.posts.at(-1).body, PROMPT, 'a Uint8Array view sends its own bytes');
  await page.page.close();
});

test('without the proxy a cut answer ends with an error and is not POSTed again', { timeout: 60_000 }, async () => {
  const postsBefore = upstream.posts.length;
  const page = await openPage(upstream.url, { path: '/v1/cut', key: 'answer-m3' });
  await waitFor(() => page.reports.length > 0, 'the end of the stream');
  // Long enough for a reconnect (50 ms) to have happened, were there one.
  await page.page.waitForTimeout(500);
  assert.equal((await page.shown()).length, 50);
  assert.deepEqual(page.reports.map((r) => r.kind), ['error']);
  const [error] = page.reports;
  assert.equal(error.readyState, 2);
  assert.match(error.message, /cannot resume: the answer to the POST had no Content-Location/);
  assert.equal(error.stats.resumable, false);
  assert.equal(upstream.posts.length - postsBefore, 1, 'never POSTed again');
  await page.page.close();
});

test('a POST waits for a slow answer past the connect timeout, and is sent once', { timeout: 60_000 }, async () => {
  const postsBefore = upstream.posts.length;
  const page = await openPage(upstream.url, { path: '/v1/slow', key: 'answer-m4' });
  await waitFor(() => page.reports.length > 0, 'the end of the stream', 30_000);
  assert.deepEqual(page.reports.map((r) => r.kind), ['close'], 'no error');
  assert.equal((await page.shown()).length, 20);
  assert.equal(upstream.posts.length - postsBefore, 1);
  await page.page.close();
});

test('method POST without a streamKey, with a body it cannot send, or shared, fails clearly', { timeout: 30_000 }, async () => {
  const page = await browser.context.newPage();
  await page.goto(`${upstream.url}/page.html?path=/v1/none&key=k`);
  await until(page, () => globalThis.tm !== undefined);
  const failures = await page.evaluate(async () => {
    const failure = (options) =>
      new Promise((resolve) => {
        const source = new globalThis.tm.ResumableEventSource('/v1/none', options);
        source.onerror = (e) => resolve({ message: e.message, readyState: source.readyState });
      });
    return [
      await failure({ method: 'POST', body: 'x' }),
      await failure({ method: 'POST', body: new Blob(['x']), streamKey: 'b' }),
      await failure({ method: 'PUT', streamKey: 'c' }),
      await failure({ method: 'POST', body: 'x', streamKey: 'd', shared: true }),
    ];
  });
  assert.match(failures[0].message, /streamKey.*required/);
  assert.match(failures[1].message, /body.*string, an ArrayBuffer or an ArrayBufferView/);
  assert.match(failures[2].message, /method/);
  assert.match(failures[3].message, /`shared` is for GET streams: a POST stream belongs to the context that sent it/);
  assert.ok(failures.every((f) => f.readyState === 2));
  await page.close();
});
