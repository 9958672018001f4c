// Type-checked by tests/run.sh (`tsc --noEmit --strict`) against the installed
// package's generated index.d.ts and mcp.d.ts: the API as a TypeScript user
// writes it.
import {
  ResumableEventSource,
  openTracker,
  initialize,
  flush,
  forgetStream,
  mcpResumption,
  type ResumableEventSourceOptions,
  type Stats,
  type EventSourceStats,
  type ResumableErrorEvent,
  type PostOptions,
  type PostStats,
} from 'tidemark';
import {
  resumableTransport,
  ResumableTransport,
  type PendingRequest,
  type ResumableTransportOptions,
} from 'tidemark/mcp';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import type { Transport } from '@modelcontextprotocol/sdk/shared/transport.js';
import type { CallToolResult, Progress } from '@modelcontextprotocol/sdk/types.js';

export async function example(token: string): Promise<string | undefined> {
  await initialize();
  const options: ResumableEventSourceOptions = {
    headers: { Authorization: `Bearer ${token}` },
    streamKey: 'inbox',
    store: 'indexeddb',
    database: 'app',
    withCredentials: false,
    reconnect: { initialDelay: 100, maxDelay: 5000, maxAttempts: null, idleTimeout: 60000 },
  };
  const source = new ResumableEventSource('/events', options);
  source.onmessage = (event: MessageEvent<string>) => {
    const data: string = event.data;
    const id: string = event.lastEventId;
    void [data, id];
  };
  source.onerror = (event: ResumableErrorEvent) => {
    const message: string | undefined = event.message;
    const retryDelay: number | undefined = event.retryDelay;
    const attempt: number | undefined = event.attempt;
    void [message, retryDelay, attempt, source.readyState === ResumableEventSource.CONNECTING];
  };
  // A handler written for plain Events still fits.
  const plain: (event: Event) => void = () => {};
  source.onerror = plain;
  source.addEventListener('update', (event) => void event);
  const state: 0 | 1 | 2 = source.readyState;
  const closed: boolean = state === ResumableEventSource.CLOSED;
  const stats: Partial<EventSourceStats> = source.stats();
  void [closed, stats.delivered, source.lastEventId, source.url];
  await source.close();

  const shared = new ResumableEventSource('/notifications', { streamKey: 'notifications', shared: true });
  const sharing: Partial<EventSourceStats> = shared.stats();
  const leads: boolean | undefined = sharing.leader;
  const followers: number | null | undefined = sharing.followers;
  const why: string | null | undefined = sharing.sharingWarning;
  void [leads, followers, why, sharing.shared];
  await shared.close();

  const tracker = await openTracker('mcp session-1', { store: 'memory' });
  const fresh: boolean = tracker.observe('42');
  const committed: void = tracker.commit();
  const many: boolean[] = tracker.observeMany(['1', '2']);
  tracker.commit();
  const trackerStats: Stats & { observed: number } = tracker.stats();
  void [fresh, committed, many, trackerStats.cursorsWritten];
  await tracker.flush();
  await tracker.close();
  await flush();
  const mcp = mcpResumption<{ progress: number }>(tracker, { onprogress: (p) => void p.progress });
  const resumeFrom: string | undefined = mcp.resumptionToken;
  mcp.onresumptiontoken('7');
  mcp.onprogress({ progress: 1 });
  void resumeFrom;
  return tracker.lastEventId;
}

// A POST stream that survives a reload (behind `tidemark proxy`).
export async function post(prompt: string, messageId: string): Promise<void> {
  const answer = new ResumableEventSource('/v1/chat', {
    method: 'POST',
    body: JSON.stringify({ prompt }),
    headers: { 'content-type': 'application/json' },
    streamKey: `answer-${messageId}`,
  });
  answer.onmessage = (e: MessageEvent<string>) => void e.data;
  answer.addEventListener('close', () => {});
  answer.onclose = (event: Event) => void event;
  const bytes: PostOptions = { method: 'POST', body: new Uint8Array([1, 2]) };
  const buffer: ResumableEventSourceOptions = { ...bytes, body: new ArrayBuffer(2), streamKey: 'k' };
  const stats: Partial<EventSourceStats> = answer.stats();
  const resumable: boolean | null | undefined = stats.resumable;
  const resumeUrl: string | null | undefined = stats.resumeUrl;
  const method: PostStats['method'] | undefined = stats.method;
  void [buffer, resumable, resumeUrl, method];
  await answer.close();
  await forgetStream(`answer-${messageId}`, { database: 'app' });
}

// A drop-in EventSource: typed listeners, a fetch of one's own, the cursor
// in the URL for servers that allow only the origin.
export function dropIn(token: () => string): void {
  const source = new ResumableEventSource('https://api.example/events', {
    fetch: (url, init) => fetch(url, { ...init, headers: { ...init.headers, authorization: token() } }),
    lastEventIdParam: 'lastEventID',
  });
  source.addEventListener('message', (e) => {
    const data: string = e.data;
    const origin: string = e.origin;
    void [data, origin];
  });
  source.addEventListener('error', (e) => {
    const code: number | undefined = e.code;
    const message: string | undefined = e.message;
    const again: boolean | undefined = e.willReconnect;
    void [code, message, again];
  });
  source.addEventListener('update', (e) => void (e.data satisfies string));
  source.addEventListener('open', { handleEvent: (e: Event) => void e });
  const mercure: ResumableEventSourceOptions = { lastEventIdParam: true };
  void mercure;
}

// tidemark/mcp: the README recipe, typed. The transport is an SDK Transport.
export async function mcpCall(show: (p: Progress) => void): Promise<string> {
  const options: ResumableTransportOptions = {
    key: 'my-app',
    database: 'app',
    requestInit: { headers: { authorization: 'Bearer x' } },
    reconnectionOptions: { initialReconnectionDelay: 100, maxReconnectionDelay: 2000, reconnectionDelayGrowFactor: 1.5, maxRetries: 5 },
    reconnect: { maxAttempts: null },
  };
  const transport: ResumableTransport = await resumableTransport('/mcp', options);
  const asSdk: Transport = transport;
  void asSdk;
  const client = new Client({ name: 'my-app', version: '1.0.0' });
  await client.connect(transport);
  const pending: PendingRequest[] = transport.pending();
  const [earlier] = pending;
  if (earlier) {
    earlier.onprogress = show;
    const id: number | string = earlier.id;
    const method: string = earlier.method;
    const from: string | undefined = earlier.resumedFrom;
    void [id, method, from];
    const result = (await earlier.result) as CallToolResult;
    return JSON.stringify(result.content);
  }
  const result = await client.callTool({ name: 'progress', arguments: { count: 3 } }, undefined, { onprogress: show });
  const resumable: boolean = transport.resumable;
  const dropped: number = transport.stats().replaysDropped;
  const cursors: (string | undefined)[] = transport.inFlight().map((r) => r.lastEventId);
  void [resumable, dropped, cursors];
  await transport.terminateSession();
  await transport.forget();
  await transport.close();
  return JSON.stringify(result.content);
}
