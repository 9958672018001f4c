// Shared by the page tests and the benchmark driver: start `tidemark serve`
// or any `tidemark` server on a free loopback port, launch Debian's Chromium
// through playwright-core, and a chaos relay that cuts chosen HTTP answers.
import { spawn } from 'node:child_process';
import net from 'node:net';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

export const root = resolve(import.meta.dirname, '../..');
/** The demo and benchmark pages, built by `npm run build` in www/. */
export const dist = join(root, 'www/dist');

/** The `tidemark` binary: TIDEMARK_BIN, else the debug build in the target dir. */
export function tidemarkBin() {
  if (process.env.TIDEMARK_BIN) return process.env.TIDEMARK_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(root, 'target');
  return join(target, 'debug/tidemark');
}

/**
 * Starts `tidemark serve --listen 127.0.0.1:0 --www www/dist ...args` and
 * resolves with its base URL, read from the address it prints: the port is
 * proven to be this server's.
 */
export async function startServer(args = []) {
  const child = spawn(tidemarkBin(), ['serve', '--listen', '127.0.0.1:0', '--www', dist, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const address = await new Promise((resolvePort, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error('tidemark serve printed no address in 10 s')), 10_000);
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`tidemark serve exited with ${code}`)));
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const line = out.split('\n')[0];
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolvePort(line.trim());
      }
    });
  });
  child.removeAllListeners('exit');
  return {
    url: `http://${address}`,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
];

const TYPES = { js: 'text/javascript', wasm: 'application/wasm', ts: 'text/plain', json: 'application/json' };

/**
 * A file of the package for a test server's `/tidemark/NAME`, from the
 * build in host-wasm/pkg: what the package ships (its `index.js` without
 * comments). Resolves with `{ body, type }`, or null for a name that is not
 * a file there.
 */
export async function packageFile(name) {
  if (!/^[\w.-]+$/.test(name)) return null;
  const file = join(root, 'host-wasm/pkg', name);
  try {
    return { body: await readFile(file), type: TYPES[name.split('.').pop()] ?? 'application/octet-stream' };
  } catch {
    return null;
  }
}

/**
 * Answers a test server's `GET /tidemark/NAME` with that file of the
 * package (404 if there is none). Resolves with whether `pathname` was one.
 */
export async function servePackage(pathname, res) {
  if (!pathname.startsWith('/tidemark/')) return false;
  const file = await packageFile(pathname.slice('/tidemark/'.length));
  if (!file) {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('no such file');
  } else {
    res.writeHead(200, { 'content-type': file.type, 'cache-control': 'no-store' });
    res.end(file.body);
  }
  return true;
}

/** Debian's Chromium with a fresh profile; `close()` removes the profile. */
export async function launchBrowser() {
  const profile = await mkdtemp(join(tmpdir(), 'tidemark-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ARGS,
  });
  return {
    context,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** Resolves when `predicate()` is truthy in the page; fails after `ms`. */
export async function until(page, predicate, arg, ms = 30_000) {
  await page.waitForFunction(predicate, arg, { timeout: ms, polling: 50 });
}

/** Asserts that `shown` holds every id 1..n exactly once, naming any repeated, missing or extra. */
export function exactlyOnce(shown, n) {
  const counts = new Map();
  for (const id of shown) counts.set(id, (counts.get(id) ?? 0) + 1);
  const twice = [...counts].filter(([, c]) => c > 1).map(([id]) => id);
  const missing = [];
  for (let id = 1; id <= n; id++) if (!counts.has(id)) missing.push(id);
  const extra = [...counts.keys()].filter((id) => !(id >= 1 && id <= n));
  assert.deepEqual({ twice, missing, extra }, { twice: [], missing: [], extra: [] }, `shown: ${shown}`);
}

/**
 * Spawns `tidemark ...args` and resolves with the address it prints first
 * on stdout (proved to be this process's: it bound port 0 and said which).
 * `stderr()` is what it wrote there so far, `waitStderr(re)` resolves with
 * the first match of `re` in it. PROXY_TEST_DEBUG=1 echoes its stderr.
 */
export async function startTidemark(args) {
  const child = spawn(tidemarkBin(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  const waiters = new Set();
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
    if (process.env.PROXY_TEST_DEBUG) process.stderr.write(chunk);
    for (const wake of waiters) wake();
  });
  const address = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`tidemark ${args[0]} printed no address in 10 s: ${stderr}`)), 10_000);
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`tidemark ${args[0]} exited with ${code}: ${stderr}`)));
    child.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('\n')) {
        clearTimeout(timer);
        resolve(out.split('\n')[0].trim());
      }
    });
  });
  child.removeAllListeners('exit');
  assert.match(address, /^127\.0\.0\.1:\d+$/);
  return {
    address,
    url: `http://${address}`,
    stderr: () => stderr,
    waitStderr(re, ms = 10_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          const match = re.exec(stderr);
          if (!match) return;
          clearTimeout(timer);
          waiters.delete(check);
          resolve(match);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`tidemark ${args[0]} wrote no ${re} on stderr in ${ms} ms: ${stderr}`));
        }, ms);
        waiters.add(check);
        check();
      });
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** Listens on a free loopback port; resolves with the port. */
export const listen = (server) =>
  new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));

/** A small seeded PRNG (mulberry32), so that a failing run can be replayed with its seed. */
export function prng(seed) {
  let a = seed >>> 0;
  return (lo, hi) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    const r = ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    return lo + Math.floor(r * (hi - lo + 1));
  };
}

/** The seed of a test's relay: `PROXY_TEST_SEED`, else `fallback`. */
export const relaySeed = (fallback) => Number(process.env.PROXY_TEST_SEED ?? fallback);

/**
 * Decodes an HTTP/1.1 chunked body as it arrives: `feed(bytes)` returns
 * the body bytes they complete; `done` once the last chunk was read.
 */
function chunkDecoder() {
  let pending = Buffer.alloc(0);
  let state = 'size';
  let left = 0;
  const decoder = {
    done: false,
    feed(bytes) {
      pending = Buffer.concat([pending, bytes]);
      const out = [];
      while (!decoder.done) {
        if (state === 'size') {
          const end = pending.indexOf('\r\n');
          if (end < 0) break;
          left = parseInt(pending.subarray(0, end).toString('latin1').split(';')[0], 16);
          pending = pending.subarray(end + 2);
          if (left === 0) decoder.done = true;
          else state = 'data';
        } else if (state === 'data') {
          if (pending.length === 0) break;
          const n = Math.min(left, pending.length);
          out.push(pending.subarray(0, n));
          pending = pending.subarray(n);
          left -= n;
          if (left === 0) state = 'crlf';
        } else {
          if (pending.length < 2) break;
          pending = pending.subarray(2);
          state = 'size';
        }
      }
      return Buffer.concat(out);
    },
  };
  return decoder;
}

/**
 * Reads HTTP/1.1 request heads and bodies (Content-Length or chunked) from
 * a client's bytes; `onRequest({ method, path, headers, body })` gets each
 * complete request (header names lowercase, body as text).
 */
function requestReader(onRequest) {
  let pending = Buffer.alloc(0);
  let head;
  let chunked;
  return (bytes) => {
    pending = Buffer.concat([pending, bytes]);
    for (;;) {
      if (!head) {
        const end = pending.indexOf('\r\n\r\n');
        if (end < 0) return;
        const [line, ...fields] = pending.subarray(0, end).toString('latin1').split('\r\n');
        const [method, path] = line.split(' ');
        const headers = {};
        for (const field of fields) {
          const colon = field.indexOf(':');
          headers[field.slice(0, colon).trim().toLowerCase()] = field.slice(colon + 1).trim();
        }
        head = { method, path, headers, length: Number(headers['content-length'] ?? 0), body: [] };
        chunked = /chunked/i.test(headers['transfer-encoding'] ?? '') ? chunkDecoder() : undefined;
        pending = pending.subarray(end + 4);
      }
      if (chunked) {
        head.body.push(chunked.feed(pending));
        pending = Buffer.alloc(0);
        if (!chunked.done) return;
      } else {
        if (pending.length < head.length) return;
        head.body.push(pending.subarray(0, head.length));
        pending = pending.subarray(head.length);
      }
      const { method, path, headers, body } = head;
      head = undefined;
      onRequest({ method, path, headers, body: Buffer.concat(body).toString('utf8'), at: Date.now() });
    }
  };
}

/**
 * Watches the answer to one request for the moment its client holds a
 * resumption token: the response head has passed and the first complete
 * SSE event with an `id:` field (as the client parses the body: chunked
 * decoded). `feed(bytes)` returns true once that moment is in or before
 * `bytes`; a head that is no 200 event stream never gets there.
 */
function firstIdWatcher() {
  let head = Buffer.alloc(0);
  let body;
  let text = '';
  let reached = false;
  let never = false;
  return (bytes) => {
    if (reached || never) return reached;
    if (!body) {
      head = Buffer.concat([head, bytes]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return false;
      const lines = head.subarray(0, end).toString('latin1').split('\r\n');
      const event = lines.some((l) => /^content-type:\s*text\/event-stream/i.test(l));
      if (!/^HTTP\/1\.1 200 /.test(lines[0]) || !event) {
        never = true;
        return false;
      }
      body = lines.some((l) => /^transfer-encoding:.*chunked/i.test(l)) ? chunkDecoder() : { feed: (b) => b };
      bytes = head.subarray(end + 4);
    }
    text += body.feed(bytes).toString('utf8').replaceAll('\r\n', '\n');
    const blocks = text.split('\n\n');
    reached = blocks.slice(0, -1).some((block) => /^id:/m.test(block));
    return reached;
  };
}

/**
 * A TCP relay to `target` (`host:port`) that cuts the connections carrying
 * the answers to the requests `cuts(request)` picks (`{ method, path,
 * headers, body }`; HTTP/1.1 without pipelining, so what the target sends
 * after a request is its answer). Other requests and answers are relayed
 * untouched.
 *
 * A picked answer is armed at its start (`after: 'start'`, when the
 * request has gone: the head may be cut too) or once the client holds a
 * resumption token from it (`after: 'event'`: head and first event with an
 * id passed, see `firstIdWatcher`), and then cut after a random number of
 * bytes in `bytes` or a random time in `ms`, whichever comes first, at most
 * `maxCuts` times in all. With `manual: true` nothing is cut at random:
 * `cutNow()` cuts every armed connection and says how many.
 *
 * `relay.requests` lists every request relayed, `relay.cutLog` every cut
 * (`{ at, request }`), `relay.cuts` counts them; `onCut(request)` is called
 * at each.
 */
export async function startChaosRelay(target, options) {
  const { seed, cuts: picks, after = 'start', bytes = [60, 1500], ms = [30, 400] } = options;
  const maxCuts = options.maxCuts ?? Infinity;
  const random = prng(seed);
  const [host, port] = target.split(':');
  const relay = { cuts: 0, streams: 0, requests: [], cutLog: [] };
  const sockets = new Set();
  const armed = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), host);
    sockets.add(client);
    sockets.add(upstream);
    // The picked request whose answer is on this connection now.
    let picked;
    let watch;
    let budget = Infinity;
    let timer;
    const cut = () => {
      if (client.destroyed && upstream.destroyed) return;
      relay.cuts++;
      relay.cutLog.push({ at: Date.now(), request: picked });
      options.onCut?.(picked);
      close();
    };
    const arm = () => {
      armed.add(cut);
      if (options.manual || relay.cuts >= maxCuts) return;
      budget = random(bytes[0], bytes[1]);
      timer = setTimeout(() => relay.cuts < maxCuts && cut(), random(ms[0], ms[1]));
    };
    const read = requestReader((request) => {
      relay.requests.push(request);
      clearTimeout(timer);
      armed.delete(cut);
      budget = Infinity;
      picked = picks(request) ? request : undefined;
      watch = undefined;
      if (!picked) return;
      relay.streams++;
      if (after === 'start') arm();
      else watch = firstIdWatcher();
    });
    client.on('data', (chunk) => {
      read(chunk);
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      if (budget !== Infinity && chunk.length >= budget && relay.cuts < maxCuts) {
        client.write(chunk.subarray(0, budget), cut);
        budget = 0;
        return;
      }
      budget -= chunk.length;
      client.write(chunk);
      if (watch?.(chunk)) {
        watch = undefined;
        arm();
      }
    });
    const close = () => {
      clearTimeout(timer);
      armed.delete(cut);
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    for (const socket of [client, upstream]) {
      socket.on('error', close);
      socket.on('close', close);
    }
  });
  const relayPort = await listen(server);
  relay.address = `127.0.0.1:${relayPort}`;
  relay.url = `http://${relay.address}`;
  relay.cutNow = () => {
    const now = [...armed];
    for (const cut of now) cut();
    return now.length;
  };
  relay.stop = async () => {
    for (const socket of sockets) socket.destroy();
    await new Promise((r) => server.close(r));
  };
  return relay;
}

/**
 * Runs `tidemark mcp <url> --tool progress ...`; `lines` fills with the
 * parsed JSON lines as they arrive, `exited` resolves with the exit code
 * (null when killed) and stderr.
 */
export function runMcp(url, state, args, stdout = 'pipe') {
  const child = spawn(tidemarkBin(), ['mcp', url, '--state', state, '--tool', 'progress', ...args], {
    stdio: ['ignore', stdout, 'pipe'],
  });
  const run = { child, lines: [], stderr: '' };
  let pending = '';
  child.stdout?.on('data', (chunk) => {
    pending += chunk;
    const complete = pending.split('\n');
    pending = complete.pop();
    for (const line of complete) run.lines.push(JSON.parse(line));
  });
  child.stderr.on('data', (chunk) => (run.stderr += chunk));
  run.exited = new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code) => resolve({ code, stderr: run.stderr }));
  });
  return run;
}

/** The progress numbers `tidemark mcp` printed, in order. */
export const progressOf = (run) =>
  run.lines.filter((l) => l.message.method === 'notifications/progress').map((l) => l.message.params.progress);
