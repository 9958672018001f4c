// `tidemark/mcp` in real Chromium, with the SDK's Client (1.32.2) against
// the fixture server mcp/server.mjs: the page www/mcp/test.html (built into
// www/dist/mcp) opens `resumableTransport` and calls the `progress` tool;
// the tests reload it, navigate away and back, cut its streams, forget its
// session at the server and open its key in a second tab. Each also checks
// one workaround for SDK 1.32.2 (the letters are those of host-wasm/js/mcp.js):
// (A) request ids unique in the session across loads, (B) a replayed
// answer reaching `pending()`, (C) a resumed stream cut before its first
// event, (D) the protocol version on a resumed session, (E) replays dropped;
// and a late cancel of an answered request, which must not reach the wire.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readFile, rm } from 'node:fs/promises';
import { extname, join } from 'node:path';
import { startMcpServer } from '../../mcp/server.mjs';
import { exactlyOnce, launchBrowser, listen, until } from './harness.mjs';
import { copyBuiltPage } from './mcp-page.mjs';

let staticDir;
let browser;
before(async () => {
  staticDir = await copyBuiltPage();
  browser = await launchBrowser();
});
after(async () => {
  await browser?.close();
  if (staticDir) await rm(staticDir, { recursive: true, force: true });
});

/** A tab on the test page of `origin`, with its console warnings and page errors. */
async function openPage(origin) {
  const page = await browser.context.newPage();
  const seen = { warnings: [], errors: [] };
  page.on('console', (m) => m.type() === 'warning' && seen.warnings.push(m.text()));
  page.on('pageerror', (e) => seen.errors.push(e.message));
  page.load = async () => {
    await page.goto(`${origin}/test.html`);
    await until(page, () => globalThis.mcpTestReady === true, undefined, 10_000);
  };
  await page.load();
  return Object.assign(page, { seen });
}

/** Reloads the page and waits for its script. */
async function reload(page) {
  await page.reload();
  await until(page, () => globalThis.mcpTestReady === true, undefined, 10_000);
}

const open = (page, key, options, answer) =>
  page.evaluate(([k, o, a]) => globalThis.mcpTest.open(k, o, a), [key, options, answer]);
const call = (page, tag, count, intervalMs, ask) =>
  page.evaluate(([t, n, ms, a]) => globalThis.mcpTest.call(t, n, ms, a), [tag, count, intervalMs, ask]);
const state = (page, tags) => page.evaluate((t) => globalThis.mcpTest.state(t), tags);

/** Waits until `check(state)` holds for the calls of `tags`, polling. */
async function waitState(page, tags, check, what, ms = 30_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const s = await state(page, tags);
    if (check(s)) return s;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function withServer(options, body) {
  const server = await startMcpServer({ port: 0, staticDir, retryInterval: 100, ...options });
  try {
    return await body(server);
  } finally {
    await server.close();
  }
}

test('two calls in flight across a reload: each progress once, both results, one POST each, ids never reused (A, B, D)', { timeout: 60_000 }, async () => {
  await withServer({}, async (server) => {
    const page = await openPage(server.url);
    try {
      const first = await open(page);
      call(page, 'a', 40, 40);
      call(page, 'b', 30, 60);
      await waitState(page, ['a', 'b'], (s) => s.a.progress.length >= 5 && s.b.progress.length >= 5, 'both calls under way');
      await reload(page);
      const second = await open(page);
      assert.equal(second.sessionId, first.sessionId, 'the same session, without initialize');
      assert.deepEqual(second.pending.map((p) => p.tag).sort(), ['a', 'b']);
      for (const p of second.pending) assert.ok(p.resumedFrom, `a cursor to resume ${p.tag} from`);
      // A new call beside the resumed ones (A): its id is new in the session.
      call(page, 'c', 10, 20);
      const s = await waitState(page, ['a', 'b', 'c'], (s) => s.a.result && s.b.result && s.c.result, 'three results');
      await page.waitForTimeout(200); // anything repeated late would show now
      const final = await state(page, ['a', 'b', 'c']);
      exactlyOnce(final.a.progress, 40);
      exactlyOnce(final.b.progress, 30);
      exactlyOnce(final.c.progress, 10);
      assert.deepEqual([s.a.result, s.b.result, s.c.result], ['done: 40 steps', 'done: 30 steps', 'done: 10 steps']);
      assert.equal(server.log.calls, 3, 'one tools/call POST per call');
      const ids = server.log.requests.filter((r) => r.session === first.sessionId || r.method === 'initialize').map((r) => r.id);
      assert.equal(new Set(ids).size, ids.length, `no request id used twice in the session: ${ids}`);
      // (D): the resumes carried the negotiated protocol version.
      const resumes = server.log.resumes.filter((r) => r.session === first.sessionId);
      assert.ok(resumes.length >= 2, 'both calls resumed');
      assert.ok(resumes.every((r) => r.protocolVersion === '2025-11-25'), JSON.stringify(resumes));
      const errors = await page.evaluate(() => globalThis.mcpTest.errors);
      assert.deepEqual(errors.filter((e) => /unknown/i.test(e)), [], 'nothing the Client could not route (B)');
      assert.equal(await page.evaluate(() => globalThis.mcpTest.transport.pending().length), 0);
      const stored = await page.evaluate(() => globalThis.mcpTest.stored());
      assert.deepEqual(stored.requests, {}, 'answered requests are no longer kept');
      assert.deepEqual(page.seen.errors, []);
    } finally {
      await page.close();
    }
  });
});

test('a call that finishes while the page is gone: its result arrives after the next load, from the server log', { timeout: 60_000 }, async () => {
  await withServer({}, async (server) => {
    const page = await openPage(server.url);
    try {
      await open(page);
      call(page, 'gone', 20, 30);
      await waitState(page, ['gone'], (s) => s.gone.progress.length >= 3, 'the call under way');
      await page.goto('about:blank');
      // The call ends at the server while no page listens.
      await new Promise((r) => setTimeout(r, 1_200));
      await page.load();
      const opened = await open(page);
      assert.deepEqual(opened.pending.map((p) => p.tag), ['gone']);
      const s = await waitState(page, ['gone'], (s) => s.gone.result || s.gone.error, 'the result');
      assert.equal(s.gone.result, 'done: 20 steps', JSON.stringify(s));
      exactlyOnce(s.gone.progress, 20);
      assert.equal(server.log.calls, 1);
    } finally {
      await page.close();
    }
  });
});

test('a resumed stream cut before its first event resumes from the stored cursor again (C)', { timeout: 60_000 }, async () => {
  await withServer({}, async (server) => {
    const page = await openPage(server.url);
    try {
      const { sessionId } = await open(page);
      call(page, 'slow', 12, 400);
      await waitState(page, ['slow'], (s) => s.slow.progress.length >= 2, 'the call under way');
      await reload(page);
      const before = server.log.resumes.length;
      const opened = await open(page);
      const deadline = Date.now() + 5_000;
      while (server.log.resumes.length === before && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
      // The resumed stream is open; cut it before its next event (400 ms apart).
      assert.ok(server.cut() >= 1, 'the cut found the call');
      const s = await waitState(page, ['slow'], (s) => s.slow.result || s.slow.error, 'the result');
      assert.equal(s.slow.result, 'done: 12 steps', JSON.stringify(s));
      exactlyOnce(s.slow.progress, 12);
      const after = server.log.resumes.slice(before).filter((r) => r.session === sessionId);
      assert.ok(after.length >= 2, `resumed again after the cut: ${JSON.stringify(after)}`);
      assert.equal(after[0].lastEventId, opened.pending[0].resumedFrom);
      assert.equal(after[1].lastEventId, opened.pending[0].resumedFrom, 'the cursor again, not no Last-Event-ID');
      assert.equal(server.log.calls, 1);
    } finally {
      await page.close();
    }
  });
});

test('a server that re-sends the Last-Event-ID event, cut and reloaded: the replays are dropped (E)', { timeout: 60_000 }, async () => {
  await withServer({ replay: 'inclusive' }, async (server) => {
    const page = await openPage(server.url);
    try {
      await open(page);
      call(page, 'dup', 40, 40);
      await waitState(page, ['dup'], (s) => s.dup.progress.length >= 5, 'the call under way');
      assert.ok(server.cut() >= 1);
      await waitState(page, ['dup'], (s) => s.dup.progress.length >= 12, 'progress after the cut');
      const droppedLive = await page.evaluate(() => globalThis.mcpTest.transport.stats().replaysDropped);
      assert.ok(droppedLive >= 1, `a replay dropped on this page's own stream: ${droppedLive}`);
      await reload(page);
      await open(page);
      const s = await waitState(page, ['dup'], (s) => s.dup.result || s.dup.error, 'the result');
      await page.waitForTimeout(200);
      assert.equal(s.dup.result, 'done: 40 steps', JSON.stringify(s));
      exactlyOnce((await state(page, ['dup'])).dup.progress, 40);
      const dropped = await page.evaluate(() => globalThis.mcpTest.transport.stats().replaysDropped);
      assert.ok(dropped >= 1, `the resumed stream's replay dropped: ${dropped}`);
    } finally {
      await page.close();
    }
  });
});

test('a resume answered 409 (the server still holds the old connection) is tried again until it resumes', { timeout: 60_000 }, async () => {
  await withServer({ conflicts: 2 }, async (server) => {
    const page = await openPage(server.url);
    try {
      await open(page);
      call(page, 'busy', 30, 50);
      await waitState(page, ['busy'], (s) => s.busy.progress.length >= 5, 'the call under way');
      await reload(page);
      const opened = await open(page);
      const s = await waitState(page, ['busy'], (s) => s.busy.result || s.busy.error, 'the result');
      assert.equal(s.busy.result, 'done: 30 steps', JSON.stringify(s));
      exactlyOnce(s.busy.progress, 30);
      const resumes = server.log.resumes.map((r) => r.lastEventId);
      assert.deepEqual(resumes.slice(0, 3), Array(3).fill(opened.pending[0].resumedFrom), 'two 409s, then the resume, each from the cursor');
      assert.equal(server.log.calls, 1);
    } finally {
      await page.close();
    }
  });
});

test('cancelling: a late cancel of an answered request reaches no one; pending.cancel() gives an earlier call up', { timeout: 60_000 }, async () => {
  await withServer({}, async (server) => {
    const page = await openPage(server.url);
    try {
      const { sessionId } = await open(page);
      call(page, 'kept', 40, 40);
      call(page, 'dropped', 400, 40);
      await waitState(page, ['kept', 'dropped'], (s) => s.kept.progress.length >= 3 && s.dropped.progress.length >= 3, 'both under way');
      await reload(page);
      const opened = await open(page);
      const byTag = Object.fromEntries(opened.pending.map((p) => [p.tag, p]));
      // The SDK sends notifications/cancelled for a request of its own even
      // after its answer (a late abort). This page's Client's ids start at
      // 0 again, so as sent it would name the earlier page's call.
      await page.evaluate(async (id) => {
        await globalThis.mcpTest.transport.send({ jsonrpc: '2.0', method: 'notifications/cancelled', params: { requestId: id } });
      }, byTag.kept.id);
      await page.evaluate((id) => globalThis.mcpTest.transport.pending().find((p) => p.id === id).cancel('enough'), byTag.dropped.id);
      const s = await waitState(page, ['kept', 'dropped'], (s) => s.kept.result && s.dropped.error, 'a result and a cancel');
      assert.equal(s.kept.result, 'done: 40 steps');
      exactlyOnce(s.kept.progress, 40);
      assert.match(s.dropped.error, /tools\/call \(request \d+\) cancelled: enough/);
      assert.deepEqual(server.log.cancelled, [{ session: sessionId, requestId: byTag.dropped.id }], 'only the call given up');
      await page.waitForTimeout(100);
      assert.deepEqual((await page.evaluate(() => globalThis.mcpTest.stored())).requests, {});
    } finally {
      await page.close();
    }
  });
});

test('a question of the server left unanswered by a reloaded page goes to the next page\'s Client, which answers it', { timeout: 60_000 }, async () => {
  await withServer({}, async (server) => {
    const page = await openPage(server.url);
    try {
      await open(page, 'test', {}, 'never');
      call(page, 'ask', 20, 40, true);
      await until(page, () => globalThis.mcpTest.asked === 1, undefined, 20_000);
      await page.waitForTimeout(300); // the cursor written past the question
      await reload(page);
      await open(page, 'test', {}, 'now');
      const s = await waitState(page, ['ask'], (s) => s.ask.result || s.ask.error, 'the result');
      assert.equal(s.ask.result, 'done: 20 steps', JSON.stringify(s));
      exactlyOnce(s.ask.progress, 20);
      assert.equal(await page.evaluate(() => globalThis.mcpTest.asked), 1, 'asked once on this page');
      assert.deepEqual(server.log.answers, ['accept']);
      assert.equal(server.log.calls, 1);
    } finally {
      await page.close();
    }
  });
});

test('a session the server forgot: the pending call fails clearly and nothing stays stored', { timeout: 60_000 }, async () => {
  await withServer({}, async (server) => {
    const page = await openPage(server.url);
    try {
      const { sessionId } = await open(page);
      call(page, 'lost', 50, 50);
      await waitState(page, ['lost'], (s) => s.lost.progress.length >= 3, 'the call under way');
      await page.goto('about:blank');
      await server.forget(sessionId);
      await page.load();
      const opened = await open(page);
      assert.equal(opened.sessionId, sessionId, 'the stored session, until the server says otherwise');
      const s = await waitState(page, ['lost'], (s) => s.lost.error, 'the error');
      assert.match(s.lost.error, /no longer knows session .* \(404\)/);
      let stored;
      for (let i = 0; i < 100 && (stored = await page.evaluate(() => globalThis.mcpTest.stored())) !== null; i++) {
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.equal(stored, null, 'the session is no longer kept');
      // The next load starts a new session.
      await page.load();
      const next = await open(page);
      assert.notEqual(next.sessionId, sessionId);
      assert.deepEqual(next.pending, []);
      assert.equal(server.log.calls, 1, 'the call was not sent again');
    } finally {
      await page.close();
    }
  });
});

test('a call whose answer had no event id when the page went away: reported after the reload, not sent again', { timeout: 60_000 }, async () => {
  // Plain JSON answers (the SDK's enableJsonResponse): nothing to resume from.
  await withServer({ jsonResponse: true }, async (server) => {
    const page = await openPage(server.url);
    try {
      await open(page);
      call(page, 'json', 10, 100);
      const deadline = Date.now() + 5_000;
      while (server.log.calls === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
      await reload(page);
      const opened = await open(page);
      assert.deepEqual(opened.pending.map((p) => [p.tag, p.resumedFrom]), [['json', undefined]]);
      const s = await waitState(page, ['json'], (s) => s.json.error || s.json.result, 'the error');
      assert.match(s.json.error, /tools\/call \(request \d+\) was in flight .* before its answer carried an event id: it cannot be resumed, and is not sent again/);
      assert.equal(server.log.calls, 1);
      await page.waitForTimeout(100);
      assert.deepEqual((await page.evaluate(() => globalThis.mcpTest.stored())).requests, {}, 'no longer kept');

      // The same after close(): it keeps what is stored, and the next
      // transport with the key in this page reports the call.
      call(page, 'closed', 10, 100);
      const calls = server.log.calls;
      while (server.log.calls === calls) await new Promise((r) => setTimeout(r, 10));
      await page.evaluate(() => globalThis.mcpTest.transport.close());
      const reopened = await open(page);
      assert.deepEqual(reopened.pending.map((p) => p.tag), ['closed']);
      const t = await waitState(page, ['closed'], (s) => s.closed.error?.includes('cannot be resumed'), 'the error');
      assert.equal(t.closed.result, null);
      assert.equal(server.log.calls, calls + 1);
    } finally {
      await page.close();
    }
  });
});

test('the key in use by another tab: the second waits, then fails clearly; it opens once the first closes', { timeout: 60_000 }, async () => {
  await withServer({}, async (server) => {
    const one = await openPage(server.url);
    const two = await openPage(server.url);
    try {
      await open(one, 'shared-key');
      const started = Date.now();
      const refused = await two.evaluate(() => globalThis.mcpTest.open('shared-key').then(() => 'opened', (e) => e.message));
      assert.match(refused, /the key "shared-key" is in use by another tab or worker/);
      assert.ok(Date.now() - started >= 2_500, 'it waited for the key');
      // Another key is free.
      await open(two, 'other-key');
      await one.close();
      const reopened = await open(two, 'shared-key');
      assert.ok(reopened.sessionId, 'the second tab has the session once the first let go');
    } finally {
      if (!one.isClosed()) await one.close();
      await two.close();
    }
  });
});

/**
 * An MCP endpoint on a revision without SSE resumability (2026-07-28): it
 * answers every request with an SSE stream without event ids, and serves
 * the test page on the same origin.
 */
async function unresumableServer() {
  const posts = [];
  const http = createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/mcp' && req.method === 'POST') {
      const chunks = [];
      for await (const c of req) chunks.push(c);
      const message = JSON.parse(Buffer.concat(chunks).toString());
      posts.push({ message, protocolVersion: req.headers['mcp-protocol-version'] });
      if (message.id === undefined) {
        res.writeHead(202).end();
        return;
      }
      const result =
        message.method === 'initialize'
          ? { protocolVersion: '2026-07-28', capabilities: { tools: {} }, serverInfo: { name: 'plain', version: '1' } }
          : { content: [{ type: 'text', text: `answer ${message.id}` }] };
      res.writeHead(200, { 'content-type': 'text/event-stream', 'mcp-session-id': 'plain-session' });
      res.end(`data: ${JSON.stringify({ jsonrpc: '2.0', id: message.id, result })}\n\n`);
      return;
    }
    if (url.pathname === '/mcp') return res.writeHead(405).end();
    try {
      const body = await readFile(join(staticDir, url.pathname === '/' ? 'index.html' : url.pathname));
      const type = { '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm' }[extname(url.pathname)];
      res.writeHead(200, { 'content-type': type ?? 'application/octet-stream' }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  const port = await listen(http);
  return {
    url: `http://127.0.0.1:${port}`,
    posts,
    close: () => {
      http.closeAllConnections();
      return new Promise((r) => http.close(r));
    },
  };
}

test('a 2026-07-28 server: said once, nothing kept, the transport as the SDK has it', { timeout: 60_000 }, async () => {
  const server = await unresumableServer();
  const page = await openPage(server.url);
  try {
    // SDK 1.32.2's Client refuses 2026-07-28 at initialize, so the page
    // drives the transport as a Client that speaks it would. It says where
    // it is in `step`, for a run that stops midway.
    const steps = page.evaluate(async () => {
      const step = (s) => (globalThis.step = s);
      step('open');
      const transport = await globalThis.mcpTest.rawTransport('plain');
      step('start');
      const got = [];
      transport.onmessage = (m) => got.push(m);
      await transport.start();
      const send = async (message) => {
        step(`send ${message.id}`);
        await transport.send(message);
        step(`answer ${message.id}`);
        const deadline = Date.now() + 5_000;
        while (!got.some((m) => m.id === message.id)) {
          if (Date.now() > deadline) throw new Error(`no answer to ${message.id} in 5 s: ${JSON.stringify(got)}`);
          await new Promise((r) => setTimeout(r, 10));
        }
      };
      await send({ jsonrpc: '2.0', id: 0, method: 'initialize', params: { protocolVersion: '2026-07-28', capabilities: {}, clientInfo: { name: 't', version: '1' } } });
      transport.setProtocolVersion('2026-07-28');
      await send({ jsonrpc: '2.0', id: 1, method: 'tools/call', params: { name: 'x', arguments: {} } });
      await send({ jsonrpc: '2.0', id: 2, method: 'tools/call', params: { name: 'x', arguments: {} } });
      step('stored');
      return { got, resumable: transport.resumable, pending: transport.pending().length, stored: await globalThis.mcpTest.stored('plain') };
    });
    let timer;
    const stuck = new Promise((_, reject) => {
      timer = setTimeout(async () => {
        const at = await page.evaluate(() => globalThis.step).catch((e) => e.message);
        reject(new Error(`stuck at ${at}: ${JSON.stringify(server.posts)}`));
      }, 20_000);
    });
    const result = await Promise.race([steps, stuck]).finally(() => clearTimeout(timer));
    assert.deepEqual(result.got.map((m) => [m.id, m.result?.content?.[0]?.text ?? m.result?.protocolVersion]), [
      [0, '2026-07-28'],
      [1, 'answer 1'],
      [2, 'answer 2'],
    ], 'the answers, with the ids as sent');
    assert.equal(result.resumable, false);
    assert.equal(result.stored, null, 'nothing kept');
    const said = page.seen.warnings.filter((w) => w.includes('tidemark/mcp'));
    assert.equal(said.length, 1, `said once: ${said}`);
    assert.match(said[0], /2026-07-28, which has no SSE resumability/);
    assert.deepEqual(server.posts.slice(1).map((p) => p.protocolVersion), ['2026-07-28', '2026-07-28']);
  } finally {
    await page.close();
    await server.close();
  }
});
