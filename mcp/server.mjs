// A test fixture MCP server on the official TypeScript SDK
// (@modelcontextprotocol/sdk 1.32.2): McpServer + StreamableHTTPServerTransport,
// one stateful session per client, resumable streams through
// ./event-store.mjs, and one tool, `progress`, that streams progress
// notifications for a few seconds before it returns.
//
// On one loopback origin it serves:
//   /mcp              the MCP endpoint (POST, GET with Last-Event-ID, DELETE)
//   POST /test/cut    closes every open SSE stream of every session (the
//                     SDK's closeSSEStream / closeStandaloneSSEStream): the
//                     clients must resume
//   GET /test/log     what the server saw, as JSON: the Last-Event-ID of every
//                     resume, the cuts, the sessions
//   anything else     static files from `staticDir` (the built page,
//                     www/dist/mcp), so page and endpoint share an origin
//
// As a module: `const s = await startMcpServer({ port: 0, staticDir })` gives
// `{ url, cut(), log, close() }`. As a program: `node mcp/server.mjs --port 0
// [--static DIR] [--retry-ms N] [--replay after|inclusive] [--no-event-store]`
// prints its URL.

import { createServer } from 'node:http';
import { randomUUID } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { extname, join, resolve, sep } from 'node:path';
import { pathToFileURL } from 'node:url';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { ElicitResultSchema, EmptyResultSchema, isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';
import { MonotonicEventStore } from './event-store.mjs';

const root = resolve(import.meta.dirname, '..');
export const defaultStaticDir = join(root, 'www/dist/mcp');

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript',
  '.mjs': 'text/javascript',
  '.css': 'text/css',
  '.wasm': 'application/wasm',
  '.json': 'application/json',
  '.svg': 'image/svg+xml',
};

/** Resolves after `ms`, or rejects when `signal` aborts. */
function sleep(ms, signal) {
  return new Promise((ok, fail) => {
    if (signal.aborted) return fail(signal.reason);
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', stop);
      ok();
    }, ms);
    const stop = () => {
      clearTimeout(timer);
      fail(signal.reason);
    };
    signal.addEventListener('abort', stop, { once: true });
  });
}

/**
 * The MCP server of one session: the `progress` tool. `running` gets the
 * JSON-RPC id of each call while it runs, so `cut()` can close its stream;
 * `log.pings` counts the pings the client answered.
 */
function buildMcpServer({ running, stopping, log }) {
  const server = new McpServer({ name: 'tidemark-fixture', version: '0.1.0' });
  server.registerTool(
    'progress',
    {
      description:
        'Sends `count` progress notifications, one every `intervalMs`, then returns. ' +
        'With `ping`, it also pings the client halfway and waits for the answer; ' +
        'with `ask`, it asks the user (elicitation/create) halfway and waits up to 30 s.',
      inputSchema: {
        count: z.number().int().min(1).max(100_000),
        intervalMs: z.number().int().min(0).max(60_000),
        ping: z.boolean().optional(),
        ask: z.boolean().optional(),
      },
    },
    async ({ count, intervalMs, ping, ask }, extra) => {
      const progressToken = extra._meta?.progressToken;
      running.add(extra.requestId);
      // The call ends with the server, or when the client cancels it.
      const signal = AbortSignal.any([stopping, extra.signal]);
      try {
        for (let i = 1; i <= count; i++) {
          await sleep(intervalMs, signal);
          // A request on the call's stream: the call goes on once answered.
          if (ping && i === Math.ceil(count / 2)) {
            await extra.sendRequest({ method: 'ping' }, EmptyResultSchema, { timeout: 10_000 });
            log.pings++;
          }
          if (ask && i === Math.ceil(count / 2)) {
            const answer = await extra.sendRequest(
              { method: 'elicitation/create', params: { message: 'go on?', requestedSchema: { type: 'object', properties: {} } } },
              ElicitResultSchema,
              { timeout: 30_000 },
            );
            log.answers.push(answer.action);
          }
          if (progressToken === undefined) continue;
          // Sent with relatedRequestId = this call: on the call's own stream,
          // stored in the event store even while no client is connected.
          await extra.sendNotification({
            method: 'notifications/progress',
            params: { progressToken, progress: i, total: count, message: `step ${i}` },
          });
        }
        return {
          content: [{ type: 'text', text: `done: ${count} steps` }],
          structuredContent: { steps: count },
        };
      } finally {
        running.delete(extra.requestId);
      }
    },
  );
  return server;
}

/**
 * Starts the server on 127.0.0.1.
 * @param {{ port?: number, staticDir?: string, retryInterval?: number,
 *   replay?: 'after' | 'inclusive', jsonResponse?: boolean,
 *   resumable?: boolean, conflicts?: number }} [options]
 *   `retryInterval` (ms) goes out as `retry:` on every stream's priming
 *   event: how long the client waits before it resumes a cut stream.
 *   `jsonResponse` answers each POST with plain JSON instead of an SSE
 *   stream (the SDK's `enableJsonResponse`): no progress, nothing to resume.
 *   `resumable: false` runs without an event store: no event ids.
 *   `conflicts: N` answers the first N resumes (GETs with Last-Event-ID)
 *   with 409, as a server that still holds the stream's old connection.
 */
export async function startMcpServer(options = {}) {
  const staticDir = resolve(options.staticDir ?? defaultStaticDir);
  const retryInterval = options.retryInterval ?? 100;
  const replay = options.replay ?? 'after';
  let conflicts = options.conflicts ?? 0;
  const stopper = new AbortController();
  /** session id -> { transport, server, running: Set<request id> } */
  const sessions = new Map();
  const log = {
    /**
     * `{ session, lastEventId, protocolVersion, at }` for every GET that
     * carried Last-Event-ID (`protocolVersion` its MCP-Protocol-Version).
     */
    resumes: [],
    /** `{ at, streams }` for every cut: how many streams it closed. */
    cuts: [],
    /** Session ids, in order of creation. */
    sessions: [],
    /** Errors the SDK reported (transport and server). */
    errors: [],
    /** `{ session, id, method }` of every request POSTed. */
    requests: [],
    /** `{ session, requestId }` of every `notifications/cancelled` POSTed. */
    cancelled: [],
    /** How many `tools/call` requests were POSTed. */
    calls: 0,
    /** The answers (`action`) to the tool's elicitations (its `ask` option). */
    answers: [],
    /** How many pings (the tool's `ping` option) the clients answered. */
    pings: 0,
  };


  async function newSession() {
    const running = new Set();
    const server = buildMcpServer({ running, stopping: stopper.signal, log });
    const transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      eventStore: options.resumable === false ? undefined : new MonotonicEventStore({ replay }),
      retryInterval,
      enableJsonResponse: options.jsonResponse ?? false,
      onsessioninitialized: (id) => {
        sessions.set(id, { transport, server, running });
        log.sessions.push(id);
      },
      onsessionclosed: (id) => {
        sessions.delete(id);
      },
    });
    transport.onclose = () => {
      if (transport.sessionId) sessions.delete(transport.sessionId);
    };
    server.server.onerror = (error) => log.errors.push(String(error?.message ?? error));
    await server.connect(transport);
    return transport;
  }

  async function readJson(req) {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const text = Buffer.concat(chunks).toString('utf8');
    try {
      return { ok: true, body: JSON.parse(text) };
    } catch {
      return { ok: false };
    }
  }

  function jsonError(res, status, message) {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ jsonrpc: '2.0', error: { code: -32000, message }, id: null }));
  }

  async function handleMcp(req, res) {
    const sessionId = req.headers['mcp-session-id'];
    const session = typeof sessionId === 'string' ? sessions.get(sessionId) : undefined;
    if (req.method === 'GET' && req.headers['last-event-id'] !== undefined) {
      log.resumes.push({
        session: sessionId,
        lastEventId: req.headers['last-event-id'],
        protocolVersion: req.headers['mcp-protocol-version'],
        at: Date.now(),
      });
    }
    if (req.method === 'POST') {
      const parsed = await readJson(req);
      if (!parsed.ok) return jsonError(res, 400, 'Parse error: invalid JSON');
      if (parsed.body?.method === 'tools/call') log.calls++;
      if (parsed.body?.method !== undefined && parsed.body?.id !== undefined) {
        log.requests.push({ session: sessionId, id: parsed.body.id, method: parsed.body.method });
      }
      if (parsed.body?.method === 'notifications/cancelled') {
        log.cancelled.push({ session: sessionId, requestId: parsed.body.params?.requestId });
      }
      if (session) return session.transport.handleRequest(req, res, parsed.body);
      if (sessionId === undefined && isInitializeRequest(parsed.body)) {
        const transport = await newSession();
        return transport.handleRequest(req, res, parsed.body);
      }
      return jsonError(res, sessionId === undefined ? 400 : 404, sessionId === undefined ? 'No session' : 'Session not found');
    }
    if (req.method === 'GET' && req.headers['last-event-id'] !== undefined && conflicts > 0) {
      // As a server that still holds the stream's old connection answers.
      conflicts--;
      return jsonError(res, 409, 'Conflict: the stream already has a connection');
    }
    if (req.method === 'GET' || req.method === 'DELETE') {
      if (!session) return jsonError(res, sessionId === undefined ? 400 : 404, 'Session not found');
      return session.transport.handleRequest(req, res);
    }
    res.writeHead(405, { allow: 'GET, POST, DELETE' });
    res.end();
  }

  /** Closes every SSE stream of every session; returns how many requests' streams. */
  function cut() {
    let streams = 0;
    for (const { transport, running } of sessions.values()) {
      transport.closeStandaloneSSEStream();
      for (const requestId of running) {
        transport.closeSSEStream(requestId);
        streams++;
      }
    }
    log.cuts.push({ at: Date.now(), streams });
    return streams;
  }

  async function serveStatic(req, res, pathname) {
    let file = resolve(staticDir, `.${decodeURIComponent(pathname)}`);
    if (file !== staticDir && !file.startsWith(staticDir + sep)) return notFound(res);
    try {
      if ((await stat(file)).isDirectory()) file = join(file, 'index.html');
      const body = await readFile(file);
      res.writeHead(200, {
        'content-type': TYPES[extname(file)] ?? 'application/octet-stream',
        'cache-control': 'no-store',
      });
      res.end(req.method === 'HEAD' ? undefined : body);
    } catch {
      notFound(res);
    }
  }

  function notFound(res) {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found');
  }

  const http = createServer(async (req, res) => {
    const { pathname } = new URL(req.url, 'http://localhost');
    try {
      if (pathname === '/mcp') return await handleMcp(req, res);
      if (pathname === '/test/cut' && req.method === 'POST') {
        const streams = cut();
        res.writeHead(200, { 'content-type': 'application/json' });
        return res.end(JSON.stringify({ streams }));
      }
      if (pathname === '/test/log' && req.method === 'GET') {
        res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
        return res.end(JSON.stringify(log));
      }
      if (req.method === 'GET' || req.method === 'HEAD') return await serveStatic(req, res, pathname);
      notFound(res);
    } catch (error) {
      log.errors.push(String(error?.stack ?? error));
      if (!res.headersSent) jsonError(res, 500, 'Internal error');
      else res.destroy();
    }
  });

  await new Promise((ok, fail) => {
    http.once('error', fail);
    http.listen(options.port ?? 0, '127.0.0.1', ok);
  });
  // Bound here, read back: the port is this server's.
  const { port } = http.address();
  const url = `http://127.0.0.1:${port}`;

  return {
    url,
    log,
    cut,
    /**
     * Forgets a session as a restarted server would: its requests get 404
     * from now on, and its running calls stop.
     */
    async forget(id) {
      const session = sessions.get(id);
      sessions.delete(id);
      await session?.server.close().catch(() => {});
    },
    /** Active sessions' ids. */
    sessions: () => [...sessions.keys()],
    async close() {
      stopper.abort(new Error('server closing'));
      await Promise.all([...sessions.values()].map(({ server }) => server.close().catch(() => {})));
      sessions.clear();
      http.closeAllConnections();
      await new Promise((ok) => http.close(() => ok()));
    },
  };
}

// `node mcp/server.mjs --port 0 [--static DIR] [--retry-ms N] [--replay after|inclusive] [--no-event-store]`
if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const args = process.argv.slice(2);
  const value = (name, fallback) => {
    const i = args.indexOf(name);
    return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
  };
  const server = await startMcpServer({
    port: Number(value('--port', '0')),
    staticDir: value('--static', defaultStaticDir),
    retryInterval: Number(value('--retry-ms', '100')),
    replay: value('--replay', 'after'),
    resumable: !args.includes('--no-event-store'),
  });
  process.stdout.write(`${server.url}\n`);
  const stop = async () => {
    await server.close();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}
