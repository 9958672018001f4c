// The native MCP mode, `tidemark mcp`, against the fixture server
// mcp/server.mjs (the MCP TypeScript SDK's McpServer and
// StreamableHTTPServerTransport with a resumable event store, on 127.0.0.1
// port 0). The test cuts the server's streams and kills the client with
// SIGKILL mid-call; the restarted client must resume the same call in the
// same session, and the two runs together must print every progress
// notification, each run none twice, and repeat only what came after the
// cursor the first run had written. MCP_TEST_DEBUG=1 prints the server log.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startMcpServer } from '../../mcp/server.mjs';
import { exactlyOnce, progressOf, runMcp } from './harness.mjs';

let scratch;
before(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'tidemark-mcp-native-'));
});
after(async () => {
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** A fresh state directory. */
let states = 0;
const newState = () => join(scratch, `state-${++states}`);

const resultOf = (run) => run.lines.find((l) => l.message.id === 1 && 'result' in l.message);
/** The numeric sequence of an event id of the fixture's store, `<stream>.<seq>`. */
const seqOf = (id) => Number(id.split('.')[1]);

async function waitFor(predicate, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Fails after `ms` unless `promise` settles. */
function within(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function withServer(options, body) {
  const server = await startMcpServer({ port: 0, staticDir: scratch, retryInterval: 100, ...options });
  try {
    await body(server);
  } finally {
    if (process.env.MCP_TEST_DEBUG) console.log(JSON.stringify(server.log, null, 1));
    await server.close();
  }
}

async function killed(run) {
  run.child.kill('SIGKILL');
  const { code } = await within(run.exited, 10_000, 'the killed client to exit');
  assert.equal(code, null, 'the client died of SIGKILL');
}

test('a tool call resumes across cut streams and a kill -9: every progress once per run, repeats only after the stored cursor', async () => {
  await withServer({}, async (server) => {
    const count = 150;
    const endpoint = `${server.url}/mcp`;
    const state = newState();
    // The tool pings the client at step 75, on the call's stream.
    const args = ['--arguments', JSON.stringify({ count, intervalMs: 20, ping: true })];

    const first = runMcp(endpoint, state, args);
    for (const at of [20, 50]) {
      await waitFor(() => progressOf(first).length >= at, `${at} progress lines`);
      assert.equal(server.cut(), 1, 'the call stream was cut');
    }
    await waitFor(() => progressOf(first).length >= 90, '90 progress lines');
    // Each cut was reported as it happened, and each return with its id.
    const lost = [...first.stderr.matchAll(/connection lost: .*; reconnecting in .* \(attempt 1\)/g)];
    const back = [...first.stderr.matchAll(/connection is back, resumed from Last-Event-ID \S+/g)];
    assert.equal(lost.length, 2, first.stderr);
    assert.equal(back.length, 2, first.stderr);
    assert.ok(lost[0].index < back[0].index && back[0].index < lost[1].index, first.stderr);
    await killed(first);
    const resumesBefore = server.log.resumes.length;
    assert.ok(resumesBefore >= 2, `the first run resumed after each cut: ${JSON.stringify(server.log.resumes)}`);

    const second = runMcp(endpoint, state, args);
    const { code, stderr } = await within(second.exited, 30_000, 'the resumed call to finish');
    assert.equal(code, 0, stderr);
    assert.match(stderr, /resuming the call of progress in session .* from Last-Event-ID/);

    // One session and one call: the restart resumed them.
    assert.equal(server.log.sessions.length, 1, JSON.stringify(server.log.sessions));
    assert.equal(server.log.calls, 1);
    assert.equal(server.log.pings, 1, 'the ping was answered');
    assert.ok(first.lines.some((l) => l.message.method === 'ping'), 'the ping was printed');
    const stored = server.log.resumes[resumesBefore];
    assert.equal(stored.session, server.log.sessions[0]);

    const p1 = progressOf(first);
    const p2 = progressOf(second);
    assert.equal(new Set(p1).size, p1.length, `the first run printed a progress twice: ${p1}`);
    assert.equal(new Set(p2).size, p2.length, `the second run printed a progress twice: ${p2}`);
    exactlyOnce([...new Set([...p1, ...p2])], count);

    // What the second run repeats is exactly what the first printed after
    // the cursor it had written: nothing before it, nothing lost.
    const repeatedIds = second.lines.map((l) => l.id).filter((id) => first.lines.some((l) => l.id === id));
    const afterCursor = first.lines.map((l) => l.id).filter((id) => seqOf(id) > seqOf(stored.lastEventId));
    assert.deepEqual(repeatedIds, afterCursor);
    assert.equal(seqOf(second.lines[0].id), seqOf(stored.lastEventId) + 1, 'resumed right after the cursor');
    assert.ok(afterCursor.length < p1.length / 2, `the cursor was written as the first run went: ${afterCursor.length} repeats`);

    const result = resultOf(second);
    assert.ok(result, 'the result arrived');
    assert.deepEqual(result.message.result.structuredContent, { steps: count });
    // The call is over: its record is gone and the session was ended.
    assert.deepEqual(await readdir(join(state, 'mcp')), []);
    assert.deepEqual(server.sessions(), []);
  });
});

test('replays of events already delivered are dropped (a server re-sending Last-Event-ID)', async () => {
  await withServer({ replay: 'inclusive' }, async (server) => {
    const count = 60;
    const run = runMcp(`${server.url}/mcp`, newState(), ['--arguments', JSON.stringify({ count, intervalMs: 20 })]);
    for (const at of [10, 25, 40]) {
      await waitFor(() => progressOf(run).length >= at, `${at} progress lines`);
      server.cut();
    }
    const { code, stderr } = await within(run.exited, 30_000, 'the call to finish');
    assert.equal(code, 0, stderr);
    assert.equal(server.log.resumes.length, 3);
    exactlyOnce(progressOf(run), count);
    assert.ok(resultOf(run));
  });
});

test("the server's retry: sets the wait before resuming", async () => {
  const retryInterval = 1500;
  await withServer({ retryInterval }, async (server) => {
    const run = runMcp(`${server.url}/mcp`, newState(), ['--arguments', JSON.stringify({ count: 100, intervalMs: 20 })]);
    await waitFor(() => progressOf(run).length >= 5, '5 progress lines');
    server.cut();
    const { code, stderr } = await within(run.exited, 30_000, 'the call to finish');
    assert.equal(code, 0, stderr);
    exactlyOnce(progressOf(run), 100);
    const [cut] = server.log.cuts;
    const [resume] = server.log.resumes;
    assert.ok(resume.at - cut.at >= retryInterval, `resumed ${resume.at - cut.at} ms after the cut`);
    // The default first backoff is far shorter: the wait is the server's.
    assert.ok(resume.at - cut.at < 3 * retryInterval, `resumed ${resume.at - cut.at} ms after the cut`);
  });
});

test('a session the server forgot is a clear error; --new starts the call again', async () => {
  await withServer({}, async (server) => {
    const endpoint = `${server.url}/mcp`;
    const state = newState();
    const args = ['--arguments', JSON.stringify({ count: 1000, intervalMs: 20 })];
    const first = runMcp(endpoint, state, args);
    await waitFor(() => progressOf(first).length >= 5, '5 progress lines');
    await killed(first);
    const [session] = server.sessions();
    const deleted = await fetch(endpoint, { method: 'DELETE', headers: { 'mcp-session-id': session } });
    assert.equal(deleted.status, 200);

    const second = runMcp(endpoint, state, args);
    const { code, stderr } = await within(second.exited, 20_000, 'the client to give up');
    assert.equal(code, 1);
    // The session id works like a bearer token: stderr shows a prefix only.
    assert.match(stderr, new RegExp(`no longer knows session ${session.slice(0, 8)}….*--new`));
    assert.ok(!stderr.includes(session), `the whole session id is on stderr: ${stderr}`);
    assert.deepEqual(second.lines, []);

    // Another tool call under the same name is refused while one is unfinished.
    const other = runMcp(endpoint, state, ['--arguments', JSON.stringify({ count: 2, intervalMs: 0 })]);
    const refused = await within(other.exited, 20_000, 'the conflicting call to be refused');
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /unfinished call of this name/);

    const third = runMcp(endpoint, state, ['--new', '--arguments', JSON.stringify({ count: 3, intervalMs: 0 })]);
    const fresh = await within(third.exited, 20_000, 'the new call to finish');
    assert.equal(fresh.code, 0, fresh.stderr);
    exactlyOnce(progressOf(third), 3);
    assert.equal(server.log.sessions.length, 2, 'a new session');
  });
});

test('a message that cannot be written is not delivered: the rerun prints it', async () => {
  await withServer({}, async (server) => {
    const count = 20;
    const endpoint = `${server.url}/mcp`;
    const state = newState();
    const args = ['--arguments', JSON.stringify({ count, intervalMs: 10 })];
    // /dev/full fails every write (ENOSPC): the first progress is never printed.
    const full = openSync('/dev/full', 'w');
    const first = runMcp(endpoint, state, args, full);
    const failed = await within(first.exited, 20_000, 'the client to fail');
    closeSync(full);
    assert.equal(failed.code, 1);
    assert.match(failed.stderr, /writing output/);

    const second = runMcp(endpoint, state, args);
    const { code, stderr } = await within(second.exited, 20_000, 'the resumed call to finish');
    assert.equal(code, 0, stderr);
    exactlyOnce(progressOf(second), count);
    assert.equal(server.log.calls, 1);
  });
});

test('a stream without event ids cannot be resumed: a clear error, and the call is not posted again', async () => {
  await withServer({ resumable: false }, async (server) => {
    const run = runMcp(`${server.url}/mcp`, newState(), ['--arguments', JSON.stringify({ count: 100, intervalMs: 20 })]);
    await waitFor(() => progressOf(run).length >= 5, '5 progress lines');
    server.cut();
    const { code, stderr } = await within(run.exited, 20_000, 'the client to give up');
    assert.equal(code, 1);
    assert.match(stderr, /no event id .* nothing to resume from/);
    assert.equal(server.log.calls, 1);
  });
});

test('a server answering with plain JSON after 11 s gives the result, posted once (nothing to resume)', async () => {
  await withServer({ jsonResponse: true }, async (server) => {
    // Longer than the 10 s the connector gives a GET's response head.
    const run = runMcp(`${server.url}/mcp`, newState(), ['--arguments', JSON.stringify({ count: 11, intervalMs: 1000 })]);
    const { code, stderr } = await within(run.exited, 30_000, 'the call to finish');
    assert.equal(code, 0, stderr);
    assert.equal(run.lines.length, 1);
    assert.equal(run.lines[0].id, null);
    assert.deepEqual(resultOf(run).message.result.structuredContent, { steps: 11 });
    assert.equal(server.log.calls, 1);
  });
});
