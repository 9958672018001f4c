// An MCP tool call whose progress survives dropped streams and page reloads.
// The SDK's own Client and StreamableHTTPClientTransport talk to /mcp (the
// fixture server mcp/server.mjs); tidemark's tracker is fed from the SDK's
// resumption-token hooks and keeps the stream's cursor in IndexedDB.
//
// - Start: connect (initialize), open a tracker for the call, call the
//   `progress` tool with `onprogress` and `onresumptiontoken`.
// - A dropped stream: the SDK resumes it by itself (GET + Last-Event-ID).
// - A reload: the page finds the call in sessionStorage (session id, protocol
//   version, request id), connects a new transport with that session id
//   (Client.connect then skips initialize), reopens the tracker and sends
//   the same request with `resumptionToken: tracker.lastEventId`.
//
// Each progress notification is shown once: the SDK calls onresumptiontoken
// with an event's id right before it dispatches that event's message, so
// `tracker.observe(token)` there says whether the next progress is fresh,
// and mcpResumption commits the cursor once `show` has returned (an event
// without progress, such as the priming event, in the next task).
// Tests read `globalThis.mcpDemo`, and the progress numbers shown, across
// reloads, in sessionStorage `shown`.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { CallToolResultSchema } from '@modelcontextprotocol/sdk/types.js';
import { openTracker, mcpResumption } from 'tidemark';
import { resumeGlue } from './sdk-resume.js';

const CALL = 'mcp-call'; // sessionStorage: the call to resume after a reload
const endpoint = new URL('/mcp', location.href);
// The server's `retry:` (on each stream's priming event) wins over these
// while it is known; a resumed stream after a reload has not seen one.
const reconnectionOptions = {
  initialReconnectionDelay: 100,
  maxReconnectionDelay: 2000,
  reconnectionDelayGrowFactor: 1.5,
  maxRetries: 10,
};

const $ = (id) => document.getElementById(id);

const demo = {
  phase: 'idle',
  /** Progress numbers shown by this page load. */
  shown: [],
  /** Replayed events dropped by this page load (all loads: sessionStorage `dropped`). */
  dropped: 0,
  /** The tool's result text, once it arrived (this load or an earlier one). */
  result: null,
  /** The token this page load resumed from, if it resumed. */
  resumedFrom: null,
  errors: [],
  call: null,
  tracker: null,
  client: null,
  /** Starts a call; failures show in `phase` and `errors`. */
  start: (count, intervalMs) => start(count, intervalMs).catch(fail),
};
globalThis.mcpDemo = demo;

function appendList(key, value) {
  const old = sessionStorage.getItem(key);
  sessionStorage.setItem(key, old ? `${old},${value}` : String(value));
}

function render() {
  $('phase').textContent = demo.phase;
  $('session').textContent = demo.call?.sessionId ?? '-';
  $('cursor').textContent = demo.tracker?.lastEventId ?? 'none';
  $('count').textContent = String(demo.shown.length);
  $('dropped').textContent = String(demo.dropped);
  $('result').textContent = demo.result ?? '-';
}

function show({ progress, total, message }) {
  demo.shown.push(progress);
  appendList('shown', progress);
  const item = document.createElement('li');
  item.textContent = `${progress}/${total}  ${message ?? ''}`;
  const list = $('progress');
  list.prepend(item);
  while (list.childElementCount > 200) list.lastElementChild.remove();
  document.dispatchEvent(new CustomEvent('mcp:shown', { detail: progress }));
  render();
}

function dropped() {
  demo.dropped++;
  sessionStorage.setItem('dropped', String(Number(sessionStorage.getItem('dropped') ?? 0) + 1));
}

function fail(error) {
  demo.phase = 'error';
  demo.errors.push(String(error?.message ?? error));
  render();
}

function newClient() {
  const client = new Client({ name: 'tidemark-mcp-page', version: '0.1.0' });
  client.onerror = (error) => demo.errors.push(String(error?.message ?? error));
  return client;
}

function toolCall(count, intervalMs) {
  return { method: 'tools/call', params: { name: 'progress', arguments: { count, intervalMs } } };
}

/** Runs the request to its end, then records the result. */
async function finish(pending, tracker) {
  const result = await pending;
  const text = result.content?.find((c) => c.type === 'text')?.text ?? JSON.stringify(result);
  demo.result = text;
  demo.phase = 'done';
  demo.call = { ...demo.call, result: text };
  sessionStorage.setItem(CALL, JSON.stringify(demo.call));
  sessionStorage.setItem('result', text);
  await tracker.close();
  render();
}

/** Starts a new call of the `progress` tool. */
async function start(count = 60, intervalMs = 50) {
  demo.phase = 'connecting';
  render();
  const transport = new StreamableHTTPClientTransport(endpoint, { reconnectionOptions });
  const client = newClient();
  demo.client = client;
  await client.connect(transport);
  const glue = resumeGlue(transport);
  const call = {
    sessionId: transport.sessionId,
    protocolVersion: transport.protocolVersion,
    callKey: crypto.randomUUID(),
    count,
    intervalMs,
  };
  demo.call = call;
  const tracker = await openTracker(`mcp ${endpoint} ${call.sessionId} ${call.callKey}`);
  demo.tracker = tracker;
  const resumption = mcpResumption(tracker, { onprogress: show, onreplay: dropped });
  let saved = false;
  demo.phase = 'streaming';
  render();
  const pending = client.request(toolCall(count, intervalMs), CallToolResultSchema, {
    ...resumption, // resumptionToken is undefined: a new call
    onresumptiontoken: (token) => {
      resumption.onresumptiontoken(token);
      // Resumable from the first token on (the server's priming event).
      if (!saved) {
        saved = true;
        sessionStorage.setItem(CALL, JSON.stringify(call));
      }
      render();
    },
    timeout: 300_000,
  });
  // Protocol.request sent it synchronously: the glue saw its id.
  call.requestId = glue.lastRequestId;
  await finish(pending, tracker);
}

/** Resumes the call a previous load of this page started. */
async function resume(call) {
  demo.call = call;
  demo.phase = 'resuming';
  render();
  const tracker = await openTracker(`mcp ${endpoint} ${call.sessionId} ${call.callKey}`);
  demo.tracker = tracker;
  const token = tracker.lastEventId;
  if (token === undefined) throw new Error('the call has no stored cursor: it cannot be resumed');
  demo.resumedFrom = token;
  appendList('resumedFrom', token);
  // A session id makes Client.connect skip initialize (client/index.js), so
  // it also skips setting the protocol version header: restore it.
  const transport = new StreamableHTTPClientTransport(endpoint, { sessionId: call.sessionId, reconnectionOptions });
  const client = newClient();
  demo.client = client;
  await client.connect(transport);
  transport.setProtocolVersion(call.protocolVersion);
  const glue = resumeGlue(transport);
  glue.resumeAs(call.requestId);
  const resumption = mcpResumption(tracker, { onprogress: show, onreplay: dropped });
  demo.phase = 'streaming';
  render();
  const pending = client.request(toolCall(call.count, call.intervalMs), CallToolResultSchema, {
    ...resumption, // resumptionToken === token
    onresumptiontoken: (t) => {
      resumption.onresumptiontoken(t);
      render();
    },
    timeout: 300_000,
  });
  await finish(pending, tracker);
}

// What the cursor was when this page went away: the next load must resume
// from exactly this token (tidemark writes it on pagehide).
addEventListener('pagehide', () => {
  if (demo.tracker && demo.result === null) appendList('cursorAtPagehide', demo.tracker.lastEventId ?? '');
});

$('start').addEventListener('click', () => {
  sessionStorage.clear();
  start(Number($('n').value), Number($('interval').value)).catch(fail);
});

const saved = JSON.parse(sessionStorage.getItem(CALL) ?? 'null');
if (saved && saved.result === undefined) {
  resume(saved).catch(fail);
} else {
  if (saved) {
    demo.call = saved;
    demo.result = saved.result;
    demo.phase = 'done';
  }
  render();
}
demo.ready = true;
