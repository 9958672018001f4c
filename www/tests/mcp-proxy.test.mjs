// MCP servers made resumable by `tidemark proxy` (issue 15): the fixture
// mcp/server.mjs runs WITHOUT an event store (`resumable: false`: its
// streams carry no ids and it cannot replay), `tidemark proxy` fronts it,
// and clients reach the proxy through a chaos relay that cuts their
// connections to it mid-stream. The proxy gives every event of a session's
// streams its own id and serves a GET with `Mcp-Session-Id` and one of
// those ids as `Last-Event-ID` from its log, so the clients resume as from
// a server with an event store, and the tool runs once.
//
// - the SDK's Node client (Client + StreamableHTTPClientTransport), a
//   150-step call cut several times;
// - the page www/mcp (the SDK in Chromium), cut and reloaded mid-call, the
//   page itself loaded through the proxy;
// - `tidemark mcp`, cut and killed with SIGKILL mid-call;
// - the refusals: another session's id, no session, an unknown id; the end
//   of a session's logs on DELETE and on the upstream's 404;
// - priming events for 2025-11-25 clients, none for 2025-06-18, and
//   revision 2026-07-28's streams passed through unchanged.
//
// The relay's seeds are fixed (PROXY_TEST_SEED overrides them);
// PROXY_TEST_DEBUG=1 prints the proxy's stderr, MCP_TEST_DEBUG=1 the
// server's log.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { startMcpServer } from '../../mcp/server.mjs';
import {
  exactlyOnce,
  launchBrowser,
  listen,
  progressOf,
  relaySeed,
  runMcp,
  startChaosRelay,
  startTidemark,
} from './harness.mjs';
import { copyBuiltPage, pageCall } from './mcp-page.mjs';

/** An id the proxy gave an event: `<stream token>-<seq>`. */
const PROXY_ID = /^([0-9a-f]{32})-(\d+)$/;
const NO_SUCH_STREAM = 'tidemark proxy: no such stream\n';

let scratch;
before(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'tidemark-mcp-proxy-'));
});
after(async () => {
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** `tidemark proxy` in front of `upstream`, with metrics; `resumes()` reads its resume counter. */
async function startProxy(upstream, extra = []) {
  const proxy = await startTidemark([
    'proxy', '--upstream', upstream, '--listen', '127.0.0.1:0',
    '--retry-ms', '50', '--keep-alive-secs', '1', '--metrics-listen', '127.0.0.1:0', ...extra,
  ]);
  const [, metrics] = await proxy.waitStderr(/metrics on (http:\/\/\S+\/metrics)/);
  proxy.resumes = async () => {
    const text = await (await fetch(metrics)).text();
    const match = /^tidemark_proxy_resumes_total (\d+)$/m.exec(text);
    assert.ok(match, `no tidemark_proxy_resumes_total in ${text}`);
    return Number(match[1]);
  };
  return proxy;
}

/** The fixture without an event store, the proxy in front of it; `body` gets both. */
async function withProxiedServer(options, body) {
  const server = await startMcpServer({ port: 0, staticDir: scratch, retryInterval: 100, resumable: false, ...options });
  const proxy = await startProxy(server.url);
  try {
    await body({ server, proxy });
  } finally {
    if (process.env.MCP_TEST_DEBUG) console.error(JSON.stringify(server.log, null, 1));
    await proxy.stop();
    await server.close();
  }
}

const jsonBody = (request) => {
  try {
    return JSON.parse(request.body);
  } catch {
    return undefined;
  }
};
/** The call's streams: the `tools/call` POST's answer and the GETs that resume a stream. */
const callStreams = (request) =>
  (request.method === 'POST' && jsonBody(request)?.method === 'tools/call') ||
  (request.method === 'GET' && request.headers['last-event-id'] !== undefined);
const resumeGets = (relay) => relay.requests.filter((r) => r.method === 'GET' && r.headers['last-event-id'] !== undefined);
const toolCalls = (relay) => relay.requests.filter((r) => r.method === 'POST' && jsonBody(r)?.method === 'tools/call');

/** Fails after `ms` unless `promise` settles. */
function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function waitFor(predicate, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/**
 * The SDK's Node client calls `progress` (150 steps, 20 ms apart) through a
 * chaos relay to `target` (`host:port`), which cuts the call's streams (the
 * POST's answer, the GETs that resume it) at most 5 times, each once the
 * client holds a token from it. Checks the result, every progress once and
 * in order, at least 3 cuts, each mid-call, every resume one of the call
 * stream's ids (`ids` is their form, its group 1 the stream), moving
 * forward, in the client's session, and one tools/call from the client and
 * at the server. Resolves with the resumes.
 */
async function sdkCallThroughCuts({ target, server, ids, seed }) {
  const count = 150;
  const progress = [];
  /** How many progress notifications the client had at each cut. */
  const atCuts = [];
  const relay = await startChaosRelay(target, {
    seed,
    cuts: callStreams,
    after: 'event', // the client holds a token: the SDK resumes only then
    bytes: [200, 3000],
    ms: [80, 400],
    maxCuts: 5,
    onCut: () => atCuts.push(progress.length),
  });
  const client = new Client({ name: 'tidemark-mcp-proxy-test', version: '0.1.0' });
  const errors = [];
  client.onerror = (error) => errors.push(String(error?.message ?? error));
  // The server's `retry:` sets the wait; the backoff counts failed
  // attempts in a row only, and a cut comes after a success.
  const transport = new StreamableHTTPClientTransport(new URL(`${relay.url}/mcp`), {
    reconnectionOptions: { initialReconnectionDelay: 50, maxReconnectionDelay: 1000, reconnectionDelayGrowFactor: 1.5, maxRetries: 10 },
  });
  try {
    await client.connect(transport);
    const result = await client.callTool({ name: 'progress', arguments: { count, intervalMs: 20 } }, undefined, {
      onprogress: (p) => progress.push(p.progress),
      timeout: 30_000,
    });
    const context = `seed ${seed}, cuts at ${atCuts}, errors ${errors.join(' | ')}, log ${JSON.stringify(server.log)}`;
    assert.deepEqual(result.structuredContent, { steps: count }, context);
    assert.deepEqual(progress, Array.from({ length: count }, (_, i) => i + 1), `every progress once and in order: ${context}`);

    assert.ok(relay.cuts >= 3, `the relay cut ${relay.cuts} times: ${context}`);
    assert.ok(atCuts.every((n) => n < count), `every cut was mid-call: ${context}`);
    // One tools/call from the client and at the server: every cut was resumed.
    assert.equal(toolCalls(relay).length, 1);
    assert.equal(server.log.calls, 1, context);
    const resumes = resumeGets(relay);
    assert.ok(resumes.length >= 3, `${resumes.length} resumes: ${context}`);
    let stream;
    let seq = 0;
    for (const r of resumes) {
      const match = ids.exec(r.headers['last-event-id']);
      assert.ok(match, `resumed from ${r.headers['last-event-id']}, not of the form ${ids}`);
      stream ??= match[1];
      assert.equal(match[1], stream, 'every resume is of the call stream');
      assert.ok(Number(match[2]) >= seq, `resumes move forward: ${resumes.map((x) => x.headers['last-event-id'])}`);
      seq = Number(match[2]);
      assert.equal(r.headers['mcp-session-id'], transport.sessionId);
    }
    return resumes;
  } finally {
    await client.close();
    await relay.stop();
  }
}

test('the SDK client, cut again and again, through tidemark proxy to an SDK server without an event store: every progress once, the result, one tools/call', { timeout: 60_000 }, async () => {
  await withProxiedServer({}, async ({ server, proxy }) => {
    await sdkCallThroughCuts({ target: proxy.address, server, ids: PROXY_ID, seed: relaySeed(15_001) });
    // The proxy answered every resume from its log: the server saw none.
    assert.deepEqual(server.log.resumes, []);
    assert.ok((await proxy.resumes()) > 0, 'the proxy counted its resumes');
  });
});

test('the same client and relay against the SDK server with its event store (the harness itself)', { timeout: 60_000 }, async () => {
  // A failure here is the relay's or the client's set-up, not the proxy's.
  const server = await startMcpServer({ port: 0, staticDir: scratch, retryInterval: 50 });
  try {
    const resumes = await sdkCallThroughCuts({ target: new URL(server.url).host, server, ids: /^(\d+)\.(\d+)$/, seed: relaySeed(15_001) });
    assert.deepEqual(server.log.resumes.map((r) => r.lastEventId), resumes.map((r) => r.headers['last-event-id']));
  } finally {
    await server.close();
  }
});

test('the MCP page through tidemark proxy (cuts and reloads) to a server without an event store: every progress shown once, the result, one tools/call', { timeout: 120_000 }, async () => {
  const staticDir = await copyBuiltPage();
  const browser = await launchBrowser();
  try {
    await withProxiedServer({ staticDir }, async ({ server, proxy }) => {
      // Cut by the test, mid-call, once the page holds a token of the stream.
      const relay = await startChaosRelay(proxy.address, { seed: relaySeed(15_002), cuts: callStreams, after: 'event', manual: true });
      try {
        const disruptions = ['cut', 'reload', 'cut', 'reload', 'cut'];
        const state = await pageCall(browser, {
          origin: relay.url, // the page, too, comes through the proxy
          server,
          cut: () => relay.cutNow(),
          disruptions,
          checkResumes(state, { cuts, reloads, context }) {
            // The server saw no resume: the proxy answered them from its log.
            assert.deepEqual(server.log.resumes, [], context);
            const resumes = resumeGets(relay);
            assert.ok(resumes.length >= cuts + reloads, `resumes ${resumes.length} >= ${cuts + reloads}: ${context}`);
            assert.ok(resumes.every((r) => r.headers['mcp-session-id'] === state.call.sessionId), 'one session throughout');
            const tokens = new Set(resumes.map((r) => PROXY_ID.exec(r.headers['last-event-id'])?.[1]));
            assert.equal(tokens.size, 1, `every resume of the call stream, from a proxy id: ${context}`);
            for (const token of state.resumedFrom) {
              assert.match(token, PROXY_ID, 'a proxy id');
              assert.ok(resumes.some((r) => r.headers['last-event-id'] === token), `the proxy got Last-Event-ID ${token}`);
            }
          },
        });
        // What tidemark's tracker dropped as already seen: on each resume the
        // priming event, which carries the very id resumed after (empty data,
        // nothing shown). No message came twice.
        assert.equal(state.dropped, resumeGets(relay).length, 'one priming event per resume, nothing else repeated');
        assert.ok(relay.cuts >= 3, `${relay.cuts} cuts`);
      } finally {
        await relay.stop();
      }
    });
  } finally {
    await browser.close();
    await rm(staticDir, { recursive: true, force: true });
  }
});

test('tidemark mcp, cut and killed, through tidemark proxy to a server without an event store: one call, every progress', { timeout: 60_000 }, async () => {
  await withProxiedServer({}, async ({ server, proxy }) => {
    const count = 150;
    const seed = relaySeed(15_003);
    const relay = await startChaosRelay(proxy.address, {
      seed,
      cuts: callStreams,
      after: 'event',
      bytes: [200, 3000],
      ms: [80, 400],
      maxCuts: 4,
    });
    try {
      const endpoint = `${relay.url}/mcp`;
      const state = join(scratch, 'state-native');
      const args = ['--arguments', JSON.stringify({ count, intervalMs: 20, ping: true })];
      const first = runMcp(endpoint, state, args);
      const back = () => [...first.stderr.matchAll(/connection is back, resumed from Last-Event-ID (\S+)/g)].map((m) => m[1]);
      // Killed between cuts, each cut a lost connection it came back from.
      await waitFor(
        () => progressOf(first).length >= 100 && back().length === relay.cuts,
        `100 progress lines, back from every cut (seed ${seed}): ${first.stderr}`,
      );
      const cutsBeforeKill = relay.cuts;
      first.child.kill('SIGKILL');
      const killed = await within(first.exited, 10_000, 'the killed client to exit');
      assert.equal(killed.code, null, 'the client died of SIGKILL');
      assert.ok(cutsBeforeKill >= 2, `the relay cut ${cutsBeforeKill} times before the kill (seed ${seed})`);
      const lost = [...first.stderr.matchAll(/connection lost: /g)];
      assert.equal(lost.length, cutsBeforeKill, first.stderr);
      for (const id of back()) assert.match(id, PROXY_ID);

      const second = runMcp(endpoint, state, args);
      const { code, stderr } = await within(second.exited, 30_000, 'the resumed call to finish');
      assert.equal(code, 0, stderr);
      assert.match(stderr, /resuming the call of progress in session .* from Last-Event-ID [0-9a-f]{32}-\d+/);

      const p1 = progressOf(first);
      const p2 = progressOf(second);
      assert.equal(new Set(p1).size, p1.length, `the first run printed a progress twice: ${p1}`);
      assert.equal(new Set(p2).size, p2.length, `the second run printed a progress twice: ${p2}`);
      exactlyOnce([...new Set([...p1, ...p2])], count);
      const result = second.lines.find((l) => l.message.id === 1 && 'result' in l.message);
      assert.ok(result, 'the result arrived');
      assert.deepEqual(result.message.result.structuredContent, { steps: count });
      for (const line of [...first.lines, ...second.lines]) assert.match(line.id, PROXY_ID);

      // One session, one call, the ping answered through the proxy; the
      // resumes were the proxy's; the DELETE at the end reached the server.
      assert.equal(server.log.sessions.length, 1);
      assert.equal(server.log.calls, 1);
      assert.equal(toolCalls(relay).length, 1);
      assert.equal(server.log.pings, 1, 'the ping was answered');
      assert.deepEqual(server.log.resumes, []);
      assert.deepEqual(await readdir(join(state, 'mcp')), []);
      assert.deepEqual(server.sessions(), []);
    } finally {
      await relay.stop();
    }
  });
});

/**
 * Reads an SSE body as it arrives: `blocks` are its parsed blocks
 * (`{ id, event, data, retry, comments }`, a field undefined when absent,
 * `data` '' for an empty `data:` line), `events` those with an id, event or
 * data; `raw` is the text; `done` resolves at its end; `until(predicate)`
 * waits for a state of it; `cancel()` stops reading.
 */
function readSse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const sse = { blocks: [], events: [], raw: '', ended: false };
  const waiters = new Set();
  let buffer = '';
  const wake = () => {
    for (const check of waiters) check();
  };
  sse.done = (async () => {
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const text = decoder.decode(value, { stream: true });
        sse.raw += text;
        buffer += text.replaceAll('\r\n', '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = { comments: [] };
          for (const line of buffer.slice(0, end).split('\n')) {
            if (line.startsWith(':')) {
              block.comments.push(line.slice(1).trim());
              continue;
            }
            const colon = line.indexOf(':');
            const field = colon < 0 ? line : line.slice(0, colon);
            const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
            if (field === 'data') block.data = block.data === undefined ? value : `${block.data}\n${value}`;
            else if (field === 'id' || field === 'event' || field === 'retry') block[field] = value;
          }
          buffer = buffer.slice(end + 2);
          sse.blocks.push(block);
          if (block.id !== undefined || block.data !== undefined || block.event !== undefined) sse.events.push(block);
        }
        wake();
      }
    } catch (error) {
      sse.error = error;
    } finally {
      sse.ended = true;
      wake();
    }
  })();
  sse.until = (predicate, what, ms = 10_000) =>
    new Promise((resolve, reject) => {
      const check = () => {
        if (!predicate(sse)) return;
        clearTimeout(timer);
        waiters.delete(check);
        resolve();
      };
      const timer = setTimeout(() => {
        waiters.delete(check);
        reject(new Error(`timed out waiting for ${what}: ${JSON.stringify(sse.raw)}`));
      }, ms);
      waiters.add(check);
      check();
    });
  sse.cancel = () => reader.cancel().catch(() => {});
  return sse;
}

/** Events as `{ id, data }`: whether a `retry:` shares their block is the proxy's choice. */
const idAndData = (events) => events.map(({ id, data }) => ({ id, data }));
const messageOf = (event) => (event.data ? JSON.parse(event.data) : undefined);
const seqOf = (id) => Number(PROXY_ID.exec(id)[2]);
const tokenOf = (id) => PROXY_ID.exec(id)[1];

/**
 * An MCP session through `base` with plain HTTP: initialize at `version`,
 * then notifications/initialized. `call(arguments)` POSTs a `progress`
 * call, `get(lastEventId?)` GETs the endpoint with the session's headers,
 * `post(message)` POSTs any message.
 */
async function rawSession(base, version = '2025-11-25') {
  const endpoint = `${base}/mcp`;
  const post = (message, headers = {}) =>
    fetch(endpoint, {
      method: 'POST',
      headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', ...headers },
      body: JSON.stringify(message),
    });
  const init = await post({
    jsonrpc: '2.0',
    id: 0,
    method: 'initialize',
    params: { protocolVersion: version, capabilities: {}, clientInfo: { name: 'tidemark-raw', version: '0' } },
  });
  const answer = await init.text();
  assert.equal(init.status, 200, answer);
  assert.match(answer, /"protocolVersion":"[0-9-]+"/);
  const sessionId = init.headers.get('mcp-session-id');
  assert.ok(sessionId, 'the session id passed through');
  const headers = { 'mcp-session-id': sessionId, 'mcp-protocol-version': version };
  const note = await post({ jsonrpc: '2.0', method: 'notifications/initialized' }, headers);
  assert.equal(note.status, 202);
  let ids = 0;
  return {
    sessionId,
    headers,
    post: (message) => post(message, headers),
    call(args) {
      const id = ++ids;
      return post({ jsonrpc: '2.0', id, method: 'tools/call', params: { name: 'progress', arguments: args, _meta: { progressToken: id } } }, headers);
    },
    get(lastEventId, extra = {}) {
      const h = { accept: 'text/event-stream', ...headers, ...extra };
      if (lastEventId !== undefined) h['last-event-id'] = lastEventId;
      return fetch(endpoint, { headers: h });
    },
    delete: () => fetch(endpoint, { method: 'DELETE', headers }),
  };
}

/** A whole call of `progress` in `session`: its response and the events of its stream. */
async function wholeCall(session, args) {
  const response = await session.call(args);
  assert.equal(response.status, 200);
  assert.match(response.headers.get('content-type') ?? '', /^text\/event-stream/);
  const sse = readSse(response);
  await within(sse.done, 10_000, 'the call stream to end');
  assert.equal(sse.error, undefined);
  const messages = sse.events.filter((e) => e.data);
  assert.ok(messages.length >= 1, sse.raw);
  assert.ok('result' in messageOf(messages.at(-1)), `the stream ends with the result: ${sse.raw}`);
  return { response, sse, messages };
}

test("a resume with another session's id, with no session, or of an unknown stream is refused alike; the own session resumes", { timeout: 30_000 }, async () => {
  await withProxiedServer({}, async ({ server, proxy }) => {
    const a = await rawSession(proxy.url);
    const b = await rawSession(proxy.url);
    assert.notEqual(a.sessionId, b.sessionId);
    const { response, messages } = await wholeCall(a, { count: 6, intervalMs: 10 });
    const ids = messages.map((m) => m.id);
    for (const id of ids) assert.match(id, PROXY_ID);
    const token = tokenOf(ids[0]);
    assert.ok(ids.every((id) => tokenOf(id) === token), `one stream: ${ids}`);
    assert.equal(response.headers.get('content-location'), `/_tidemark/streams/${token}`);
    const mid = ids[2];

    // Refused alike: B's session, A's session with an unknown stream or an
    // id not of the proxy's form.
    const refusals = [
      ["B's session", b.get(mid)],
      ["A's session, an unknown stream", a.get(`${'0'.repeat(32)}-3`)],
      ["A's session, a stream token with no seq", a.get(token)],
      ["A's session, an id of another form", a.get('1.3')],
    ];
    for (const [what, pending] of refusals) {
      const refused = await within(pending, 5000, `the answer to a resume with ${what}`);
      const body = await within(refused.text(), 5000, `the body of the answer to a resume with ${what}`);
      assert.deepEqual(
        { status: refused.status, body, type: refused.headers.get('content-type') },
        { status: 404, body: NO_SUCH_STREAM, type: 'text/plain; charset=utf-8' },
        what,
      );
    }
    // No session at all: whatever the answer, none of A's stream.
    const anonymous = await within(
      fetch(`${proxy.url}/mcp`, { headers: { accept: 'text/event-stream', 'last-event-id': mid } }),
      5000,
      'the answer to a resume with no session',
    );
    const anonymousBody = await within(anonymous.text(), 5000, 'the body of the answer to a resume with no session');
    assert.ok([400, 404].includes(anonymous.status), `no session: ${anonymous.status} ${anonymousBody}`);
    assert.ok(!anonymousBody.includes(token) && !anonymousBody.includes('progress'), anonymousBody);
    // The upstream never saw a Last-Event-ID: the refused GETs stopped at the proxy.
    assert.deepEqual(server.log.resumes, []);

    // A's own session resumes after the id: the same events, and then the stream's end.
    const resumed = await a.get(mid);
    assert.equal(resumed.status, 200);
    const sse = readSse(resumed);
    await within(sse.done, 10_000, 'the resumed stream to end');
    assert.deepEqual(
      sse.events.filter((e) => e.data).map((e) => [e.id, e.data]),
      messages.slice(3).map((e) => [e.id, e.data]),
    );
    // Resumed after its last event, the ended stream has nothing more: 204.
    const after = await a.get(ids.at(-1));
    assert.equal(after.status, 204);
    assert.equal(await after.text(), '');
    assert.equal(server.log.calls, 1);
  });
});

test("DELETE ends a session's streams and logs; the upstream's 404 for a session ends its GET streams", { timeout: 30_000 }, async () => {
  await withProxiedServer({}, async ({ server, proxy }) => {
    const a = await rawSession(proxy.url);
    const { messages } = await wholeCall(a, { count: 4, intervalMs: 10 });
    const standalone = await a.get();
    assert.equal(standalone.status, 200);
    const listening = readSse(standalone);
    await listening.until((s) => s.raw.length > 0, "the first bytes of A's GET stream");
    const deleted = await a.delete();
    assert.equal(deleted.status, 200, 'the DELETE passed through');
    await within(listening.done, 5000, "A's GET stream to end after the DELETE");
    assert.deepEqual(server.sessions().includes(a.sessionId), false);
    const gone = await a.get(messages[1].id);
    assert.equal(gone.status, 404);
    assert.equal(await gone.text(), NO_SUCH_STREAM);

    // The server forgets session C (a DELETE that bypasses the proxy); the
    // proxy learns it from the 404 to C's next request through it.
    const c = await rawSession(proxy.url);
    const call = await wholeCall(c, { count: 4, intervalMs: 10 });
    const standaloneC = await c.get();
    assert.equal(standaloneC.status, 200);
    const listeningC = readSse(standaloneC);
    await listeningC.until((s) => s.raw.length > 0, "the first bytes of C's GET stream");
    const direct = await fetch(`${server.url}/mcp`, { method: 'DELETE', headers: c.headers });
    assert.equal(direct.status, 200);
    const ping = await c.post({ jsonrpc: '2.0', id: 99, method: 'ping' });
    assert.equal(ping.status, 404, 'the 404 passed through');
    await within(listeningC.done, 5000, "C's GET stream to end after the 404");
    // What was logged stays resumable.
    const resumed = await c.get(call.messages[1].id);
    assert.equal(resumed.status, 200);
    const rest = readSse(resumed);
    await within(rest.done, 5000, "C's call stream, resumed, to end");
    assert.deepEqual(
      rest.events.filter((e) => e.data).map((e) => e.id),
      call.messages.slice(2).map((e) => e.id),
    );
  });
});

test('priming: a 2025-11-25 client gets an id with empty data first on every stream, a 2025-06-18 client gets none', { timeout: 30_000 }, async () => {
  await withProxiedServer({}, async ({ proxy }) => {
    const v11 = await rawSession(proxy.url, '2025-11-25');
    const fresh = await wholeCall(v11, { count: 4, intervalMs: 10 });
    const [priming, ...rest] = fresh.sse.events;
    assert.equal(priming.data, '', `a priming event first: ${fresh.sse.raw}`);
    assert.match(priming.id, PROXY_ID);
    const token = tokenOf(priming.id);
    assert.equal(seqOf(priming.id), 0, 'a fresh stream primes at 0');
    assert.equal(fresh.response.headers.get('content-location'), `/_tidemark/streams/${token}`);
    assert.deepEqual(rest, fresh.messages, 'one priming event, then messages only');
    assert.deepEqual(rest.map((e) => seqOf(e.id)), rest.map((_, i) => i + 1));

    // A resume primes with the id it resumes after.
    const resumed = readSse(await v11.get(rest[1].id));
    await within(resumed.done, 5000, 'the resumed stream to end');
    assert.deepEqual({ id: resumed.events[0].id, data: resumed.events[0].data }, { id: rest[1].id, data: '' }, resumed.raw);
    assert.equal(resumed.events[1].id, rest[2].id);

    // The session's standalone GET stream is primed too, on its own stream.
    const standalone = readSse(await v11.get());
    await standalone.until((s) => s.events.length >= 1, 'the first event of the GET stream');
    standalone.cancel();
    const [first] = standalone.events;
    assert.equal(first.data, '', standalone.raw);
    assert.match(first.id, PROXY_ID);
    assert.notEqual(tokenOf(first.id), token);

    const v06 = await rawSession(proxy.url, '2025-06-18');
    const old = await wholeCall(v06, { count: 4, intervalMs: 10 });
    assert.deepEqual(old.sse.events, old.messages, `no event without data: ${old.sse.raw}`);
    assert.equal(seqOf(old.messages[0].id), 1);
    const oldResumed = readSse(await v06.get(old.messages[1].id));
    await within(oldResumed.done, 5000, 'the resumed stream to end');
    assert.deepEqual(idAndData(oldResumed.events), idAndData(old.messages.slice(2)), oldResumed.raw);
  });
});

/**
 * A plain upstream that answers every POST with the same SSE stream,
 * written in parts with pauses between (`{ pause: ms }`); it records the
 * requests' headers.
 */
async function startPlainUpstream(parts) {
  const requests = [];
  const server = http.createServer(async (req, res) => {
    for await (const chunk of req) void chunk;
    requests.push(req.headers);
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    for (const part of parts) {
      if (typeof part === 'string') res.write(part);
      else await new Promise((r) => setTimeout(r, part.pause));
    }
    res.end();
  });
  const port = await listen(server);
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    text: parts.filter((p) => typeof p === 'string').join(''),
    stop: async () => {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
    },
  };
}

test('revision 2026-07-28: an SSE answer passes through unchanged, keep-alive comments added at line ends', { timeout: 30_000 }, async () => {
  const progress = (n) => `data: {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":${n}}}\n\n`;
  const upstream = await startPlainUpstream([
    progress(1),
    { pause: 1600 }, // idle after a line end: a keep-alive
    'data: {"jsonrpc":"2.0","method":"notifications/progress",',
    { pause: 1600 }, // idle inside a line: no comment may split it
    '"params":{"progressToken":1,"progress":2}}\n\n',
    'id: upstream-3\ndata: {"jsonrpc":"2.0","id":1,"result":{"content":[]}}\n\n',
  ]);
  const proxy = await startProxy(upstream.url);
  try {
    const post = (headers) =>
      fetch(`${proxy.url}/mcp`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream', ...headers },
        body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'tools/call', params: { name: 'progress', arguments: {} } }),
      });
    // With and without a session id, and a logged control at 2025-11-25, at once.
    const [withSession, without, control] = await Promise.all([
      post({ 'mcp-protocol-version': '2026-07-28', 'mcp-session-id': 'session-2026' }),
      post({ 'mcp-protocol-version': '2026-07-28' }),
      post({ 'mcp-protocol-version': '2025-11-25', 'mcp-session-id': 'session-2025' }),
    ]);
    for (const [what, response] of [['with a session id', withSession], ['without one', without]]) {
      assert.equal(response.status, 200, what);
      assert.match(response.headers.get('content-type'), /^text\/event-stream/, what);
      assert.equal(response.headers.get('content-location'), null, `${what}: not logged`);
      const text = await response.text();
      const keepAlives = text.match(/(?<=^|\n): keep-alive\n/g) ?? [];
      assert.ok(keepAlives.length >= 1, `${what}: a keep-alive while idle: ${JSON.stringify(text)}`);
      assert.equal(text.split(': keep-alive').length - 1, keepAlives.length, `${what}: comments at line starts only: ${JSON.stringify(text)}`);
      assert.equal(text.replace(/(?<=^|\n): keep-alive\n/g, ''), upstream.text, `${what}: the upstream's bytes, unchanged`);
    }
    // The control: the same upstream stream at 2025-11-25 is logged, with the proxy's ids.
    assert.match(control.headers.get('content-location') ?? '', /^\/_tidemark\/streams\/[0-9a-f]{32}$/);
    const logged = readSse(control);
    await within(logged.done, 10_000, 'the logged stream to end');
    const withData = logged.events.filter((e) => e.data);
    assert.equal(withData.length, 3, logged.raw);
    for (const e of withData) assert.match(e.id, PROXY_ID);
    // The upstream got each request's version, and no Last-Event-ID.
    assert.deepEqual(upstream.requests.map((h) => h['mcp-protocol-version']).sort(), ['2025-11-25', '2026-07-28', '2026-07-28']);
    assert.ok(upstream.requests.every((h) => h['last-event-id'] === undefined));
  } finally {
    await proxy.stop();
    await upstream.stop();
  }
});
