// `tidemark/mcp`: the official MCP SDK's Streamable HTTP client transport,
// made to survive reloads. The SDK (`@modelcontextprotocol/sdk`, a peer
// dependency) is imported, never bundled. What the page keeps, under the
// app's `key`: the session id and protocol version (in IndexedDB, database
// `<database>-mcp`), every request in flight (its JSON-RPC id, method and
// params, same place) and each request's stream cursor and dedup window
// (tidemark's tracker, database `<database>`).
//
// Workarounds for SDK 1.32.2 (paths under its dist/esm/), each tested in
// www/tests/mcp-transport.test.mjs:
//
// (A) Request ids. A new page's Client numbers its requests from 0 again,
//     in the same session; the MCP spec says a request id MUST NOT be
//     reused within a session, and the SDK's server routes a response by
//     its id (server/streamableHttp.js, `_requestToStreamMapping`), so a
//     reused id sends one request's answer down another's stream. The
//     transport gives every request an id of its own on the wire, from
//     blocks of ids reserved in the stored session, and maps the answers
//     and progress notifications back to the Client's ids.
// (B) Replayed answers are for the old page's ids, which the new Client
//     does not know (shared/protocol.js, `_onresponse`: "Received a
//     response for an unknown message ID"; `_onprogress`: "...unknown
//     token"). They go to `transport.pending()`, not to the Client.
// (C) The SDK's resume of a request (`send` with `resumptionToken`) drops
//     `onresumptiontoken` (client/streamableHttp.js, `send`), so the cursor
//     of a resumed stream would never move, and a resumed stream cut
//     before its first event reconnects without `Last-Event-ID`
//     (`_handleSseStream` starts from `let lastEventId;`) and never gets
//     the answer. A resumed request is read by tidemark's own
//     ResumableEventSource instead: `Last-Event-ID` from the stored cursor
//     on every reconnect, replays dropped.
// (D) `Client.connect` skips `initialize` when the transport has a session
//     id (client/index.js, `connect`), and so never calls
//     `setProtocolVersion`: the transport restores the stored version, or
//     the server would take the session for 2025-03-26.
// (E) The transport calls `onresumptiontoken(id)` of a stream right before
//     it hands that event's message to `onmessage`, which is shared by all
//     streams: a replayed event is recognised by its id in the first
//     callback and its message dropped in the second.

import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { McpError } from '@modelcontextprotocol/sdk/types.js';
import { forgetStream, openTracker, ResumableEventSource } from './index.js';

/** The first MCP revision without SSE resumability (SEP-2575). */
const UNRESUMABLE_FROM = '2026-07-28';
/** Request ids reserved at a time in the stored session (A). */
const ID_BLOCK = 10_000;
/** `409`s in a row before a resumed request fails (about a minute of waits). */
const MAX_CONFLICTS = 10;
/** How long a new transport waits for another context to let go of its key. */
const LOCK_WAIT_MS = 3_000;

/**
 * @typedef {import('@modelcontextprotocol/sdk/shared/transport.js').Transport} Transport
 * @typedef {import('@modelcontextprotocol/sdk/shared/transport.js').TransportSendOptions} TransportSendOptions
 * @typedef {import('@modelcontextprotocol/sdk/types.js').JSONRPCMessage} JSONRPCMessage
 * @typedef {import('@modelcontextprotocol/sdk/types.js').Progress} Progress
 * @typedef {import('@modelcontextprotocol/sdk/client/streamableHttp.js').StreamableHTTPClientTransportOptions} SdkTransportOptions
 */

/**
 * Options of {@link resumableTransport}: the SDK transport's own (`fetch`,
 * `requestInit`, `authProvider`, `reconnectionOptions`, ...; not
 * `sessionId`, which the transport keeps itself) and tidemark's.
 *
 * @typedef {Omit<SdkTransportOptions, 'sessionId'> & {
 *   key: string,
 *   store?: 'indexeddb' | 'memory',
 *   database?: string,
 *   reconnect?: import('./index.js').ReconnectOptions,
 * }} ResumableTransportOptions
 *   `key` names what is kept (one session and its requests in flight): the
 *   same key in the next page resumes them. One context at a time holds a
 *   key; another that opens it waits up to 3 s for it, then rejects.
 *   `store` and `database` as for `openTracker` (`'memory'` keeps nothing
 *   across reloads). `reconnect` paces the reconnects of requests resumed
 *   from an earlier page (those of this page's own requests are the SDK's,
 *   `reconnectionOptions`).
 */

/**
 * A request an earlier page sent and that was still in flight when it went
 * away; listed by `transport.pending()` and resumed from its stored cursor
 * (a GET with `Last-Event-ID`) once the transport is started.
 *
 * @typedef {object} PendingRequest
 * @property {number | string} id The request's JSON-RPC id on the wire.
 * @property {string} method The request's method, e.g. `'tools/call'`.
 * @property {unknown} params The request's params, as sent.
 * @property {string | undefined} resumedFrom The cursor the resume started from.
 * @property {Promise<any>} result The JSON-RPC result (for `tools/call` a
 *   `CallToolResult`, not checked against a schema); rejects with the SDK's
 *   `McpError` for an error response, and with an `Error` when the request
 *   cannot be resumed (the session is gone, the page went away before the
 *   answer's first event id, the stream failed for good).
 * @property {(reason?: string) => Promise<void>} cancel Gives the request up:
 *   `result` rejects, the server gets `notifications/cancelled`, and it is
 *   no longer kept (a request whose answer never comes is otherwise resumed
 *   by every page).
 * @property {((progress: Progress) => void) | null} onprogress Receives each
 *   progress notification of the request once (`progress`, `total`,
 *   `message`). Those that arrive before it is set are kept and handed to
 *   it when it is set; set it right after `client.connect` so that none is
 *   held in memory only.
 */

/**
 * What the transport keeps of one session, stored under its key.
 *
 * @typedef {object} Saved
 * @property {string} url
 * @property {string} sessionId
 * @property {string} protocolVersion
 * @property {number} nextId The first request id no page has reserved yet.
 * @property {Record<string, SavedRequest>} requests
 */

/**
 * A request in flight, as stored: `asked` holds the server's requests on its
 * stream (elicitation, sampling) that the Client has not answered yet, by
 * their id, to hand to the next page's Client.
 *
 * @typedef {{ id: number, method: string, params: unknown, asked?: Record<string, unknown> }} SavedRequest
 */

/**
 * Where the sessions are kept: IndexedDB (database `<database>-mcp`, object
 * store `sessions`), or memory when asked for or when IndexedDB cannot be
 * opened.
 */
class SessionStore {
  /** @type {Map<string, Map<string, Saved>>} */
  static #memory = new Map();
  /** @type {Map<string, Promise<IDBDatabase | null>>} */
  static #databases = new Map();

  /** @type {IDBDatabase | null} */
  #db;
  /** @type {Map<string, Saved>} */
  #map;

  /**
   * @param {IDBDatabase | null} db
   * @param {string} name
   */
  constructor(db, name) {
    this.#db = db;
    let map = SessionStore.#memory.get(name);
    if (!map) SessionStore.#memory.set(name, (map = new Map()));
    this.#map = map;
  }

  /**
   * @param {'indexeddb' | 'memory'} kind
   * @param {string} name
   */
  static async open(kind, name) {
    if (kind === 'memory' || typeof indexedDB === 'undefined') return new SessionStore(null, name);
    let db = SessionStore.#databases.get(name);
    if (!db) {
      db = new Promise((resolve) => {
        const request = indexedDB.open(name, 1);
        request.onupgradeneeded = () => request.result.createObjectStore('sessions');
        request.onsuccess = () => resolve(request.result);
        request.onerror = () => {
          console.warn(`tidemark/mcp: IndexedDB "${name}" cannot be opened (${request.error}); sessions are kept in memory`);
          resolve(null);
        };
        request.onblocked = () => {
          console.warn(`tidemark/mcp: IndexedDB "${name}" is blocked by another tab; sessions are kept in memory`);
          resolve(null);
        };
      });
      SessionStore.#databases.set(name, db);
    }
    return new SessionStore(await db, name);
  }

  /**
   * @param {string} key
   * @returns {Promise<Saved | undefined>}
   */
  get(key) {
    if (!this.#db) return Promise.resolve(structuredClone(this.#map.get(key)));
    return this.#run('readonly', (store) => store.get(key));
  }

  /**
   * @param {string} key
   * @param {Saved | undefined} value `undefined` deletes.
   * @returns {Promise<void>}
   */
  put(key, value) {
    if (!this.#db) {
      if (value === undefined) this.#map.delete(key);
      else this.#map.set(key, structuredClone(value));
      return Promise.resolve();
    }
    return this.#run('readwrite', (store) => (value === undefined ? store.delete(key) : store.put(value, key))).then(
      () => {},
    );
  }

  /**
   * @param {IDBTransactionMode} mode
   * @param {(store: IDBObjectStore) => IDBRequest} act
   * @returns {Promise<any>}
   */
  #run(mode, act) {
    return new Promise((resolve, reject) => {
      const tx = /** @type {IDBDatabase} */ (this.#db).transaction('sessions', mode, { durability: 'relaxed' });
      const request = act(tx.objectStore('sessions'));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(new Error(`tidemark/mcp: IndexedDB: ${tx.error}`));
      tx.onabort = () => reject(new Error(`tidemark/mcp: IndexedDB: ${tx.error ?? 'aborted'}`));
    });
  }
}

let unlockedWarned = false;

/**
 * Holds the Web Lock of a key while a transport has it, so that two
 * contexts never drive one session's requests. Resolves with the function
 * that lets go; rejects when another context keeps it for 3 s.
 * @param {string} name
 * @param {string} key
 * @returns {Promise<() => void>}
 */
function holdKey(name, key) {
  const locks = globalThis.navigator?.locks;
  if (!locks) {
    if (!unlockedWarned) {
      unlockedWarned = true;
      console.warn('tidemark/mcp: no Web Locks here (not a secure context?): two tabs with one key would drive one session at once');
    }
    return Promise.resolve(() => {});
  }
  return new Promise((resolve, reject) => {
    locks
      .request(name, { signal: AbortSignal.timeout(LOCK_WAIT_MS) }, () => new Promise((release) => resolve(() => release(undefined))))
      .catch((/** @type {any} */ error) => {
        if (error?.name !== 'TimeoutError' && error?.name !== 'AbortError') return reject(error);
        reject(
          new Error(
            `tidemark/mcp: the key "${key}" is in use by another tab or worker of this origin. ` +
              'A key holds one session and its requests in flight: give each tab its own key, or close the other.',
          ),
        );
      });
  });
}

/**
 * The key of a request's stream cursor.
 * @param {string} key
 * @param {string} sessionId
 * @param {number} id
 */
const streamKey = (key, sessionId, id) => `tidemark/mcp ${key} ${sessionId} ${id}`;

/** @param {unknown} message @returns {message is { id: number | string, method: string, params?: any }} */
const isRequest = (message) => typeof message === 'object' && message !== null && 'method' in message && 'id' in message;
/** @param {unknown} message @returns {message is { id: number | string, result?: any, error?: any }} */
const isResponse = (message) =>
  typeof message === 'object' && message !== null && 'id' in message && ('result' in message || 'error' in message);

/**
 * A request of this page in flight, sent through the SDK transport.
 * @typedef {object} Live
 * @property {number | string} clientId The Client's id of the request.
 * @property {number} wireId Its id on the wire (A).
 * @property {string} streamKey Its tracker's key.
 * @property {import('./index.js').Tracker | undefined} tracker Its stream's tracker, once open.
 * @property {Promise<import('./index.js').Tracker> | undefined} opening The tracker, opening.
 * @property {string[]} early Ids observed before the tracker was open.
 */

/**
 * A request of an earlier page, resumed by a ResumableEventSource (C).
 * @typedef {PendingRequest & {
 *   wireId: number, streamKey: string, source?: ResumableEventSource,
 *   settle: (ok: boolean, value: any) => void, held: Progress[], handler: ((progress: Progress) => void) | null,
 *   done: boolean,
 * }} Resumed
 */

/**
 * The Streamable HTTP client transport of `@modelcontextprotocol/sdk`, made
 * resumable across reloads: give it to `client.connect`. Make it with
 * {@link resumableTransport}.
 *
 * @implements {Transport}
 */
export class ResumableTransport {
  /** @type {StreamableHTTPClientTransport} */
  #inner;
  /** @type {string} */
  #url;
  /** @type {string} */
  #key;
  /** @type {SessionStore} */
  #store;
  /** @type {import('./index.js').StoreOptions} */
  #storeOptions;
  /** @type {ResumableTransportOptions} */
  #options;
  /** @type {Saved | undefined} */
  #saved;
  /** Whether requests are kept: false for a server without sessions or SSE resumability. */
  #resumable = true;
  /** @type {() => void} */
  #release;
  #nextWire = 0;
  #reservedTo = ID_BLOCK;
  /** @type {Promise<void> | undefined} */
  #reserving;
  /** @type {Promise<void>} the last message's turn to be sent */
  #sending = Promise.resolve();
  /** @type {Map<number | string, Live>} by the Client's id */
  #byClient = new Map();
  /** @type {Map<number, Live>} by the wire id */
  #byWire = new Map();
  /** @type {Map<number, Resumed>} by the wire id */
  #resumed = new Map();
  /** The event whose id a stream just reported (E), until its message. @type {{ live: Live, fresh: boolean } | undefined} */
  #event;
  #replaysDropped = 0;
  /** @type {Promise<void>} writes of the stored session, in order */
  #writes = Promise.resolve();
  #warned = false;
  #closing = false;

  /** @type {((message: JSONRPCMessage, extra?: any) => void) | undefined} */
  onmessage;
  /** @type {((error: Error) => void) | undefined} */
  onerror;
  /** @type {(() => void) | undefined} */
  onclose;

  /**
   * Use {@link resumableTransport}.
   * @internal
   * @param {string} url
   * @param {ResumableTransportOptions} options
   * @param {SessionStore} store
   * @param {Saved | undefined} saved
   * @param {Map<number, string | undefined>} cursors The stored cursor of each request in `saved`.
   * @param {() => void} release
   */
  constructor(url, options, store, saved, cursors, release) {
    const { key, store: storeKind, database, reconnect, ...sdk } = options;
    this.#url = url;
    this.#key = key;
    this.#store = store;
    this.#storeOptions = {};
    if (storeKind) this.#storeOptions.store = storeKind;
    if (database) this.#storeOptions.database = database;
    this.#options = options;
    this.#saved = saved;
    this.#release = release;
    const userFetch = sdk.fetch ?? ((/** @type {any} */ u, /** @type {any} */ i) => fetch(u, i));
    this.#inner = new StreamableHTTPClientTransport(new URL(url), {
      ...sdk,
      sessionId: saved?.sessionId,
      // Sees every answer, to notice a session the server forgot.
      fetch: async (input, init) => {
        const response = await userFetch(input, init);
        if (response.status === 404 && new Headers(init?.headers).has('mcp-session-id')) this.#sessionGone();
        return response;
      },
    });
    if (saved) {
      this.#nextWire = saved.nextId - ID_BLOCK;
      this.#reservedTo = saved.nextId;
      for (const record of Object.values(saved.requests)) {
        this.#resumed.set(record.id, this.#pendingOf(record, cursors.get(record.id)));
      }
    }
    this.#inner.onmessage = (message) => this.#receive(message);
    this.#inner.onerror = (error) => this.onerror?.(error);
    this.#inner.onclose = () => this.onclose?.();
  }

  /** The MCP session id, once the server gave one (or the stored one). */
  get sessionId() {
    return this.#inner.sessionId;
  }

  /** The negotiated protocol version (or the stored one). */
  get protocolVersion() {
    return this.#inner.protocolVersion;
  }

  /**
   * Whether requests are kept across reloads: `false` once the server is
   * known to give no session id or to speak a revision without SSE
   * resumability (2026-07-28 and later); the transport then behaves like
   * the SDK's.
   */
  get resumable() {
    return this.#resumable;
  }

  /**
   * The requests an earlier page left in flight, resumed once the
   * transport is started; each leaves the list when its answer arrives or
   * it fails. See {@link PendingRequest}.
   * @returns {PendingRequest[]}
   */
  pending() {
    return this.#unanswered();
  }

  /** The resumed requests not yet answered. */
  #unanswered() {
    return [...this.#resumed.values()].filter((r) => !r.done);
  }

  /**
   * Every request in flight with its stream's cursor: this page's (through
   * the Client) and those resumed from an earlier page.
   * @returns {{ id: number | string, method: string | undefined, lastEventId: string | undefined, resumed: boolean }[]}
   */
  inFlight() {
    const own = [...this.#byWire.values()].map((live) => ({
      id: live.wireId,
      method: this.#saved?.requests[live.wireId]?.method,
      lastEventId: live.tracker ? live.tracker.lastEventId : live.early.at(-1),
      resumed: false,
    }));
    const resumed = this.#unanswered().map((r) => ({ id: r.id, method: r.method, lastEventId: r.source?.lastEventId, resumed: true }));
    return [...own, ...resumed];
  }

  /**
   * Counters: replayed events dropped (on this page's streams and on the
   * resumed ones) and the requests kept in the store.
   * @returns {{ replaysDropped: number, requestsKept: number }}
   */
  stats() {
    let dropped = this.#replaysDropped;
    for (const r of this.#unanswered()) dropped += r.source?.stats().duplicates ?? 0;
    return { replaysDropped: dropped, requestsKept: Object.keys(this.#saved?.requests ?? {}).length };
  }

  /**
   * Called by `client.connect`. With a stored session it restores the
   * protocol version (D), resumes the requests an earlier page left in
   * flight (C), and opens the session's GET stream.
   * @returns {Promise<void>}
   */
  async start() {
    await this.#inner.start();
    if (!this.#saved) return;
    this.#inner.setProtocolVersion(this.#saved.protocolVersion);
    for (const pending of this.#resumed.values()) this.#resume(pending);
    // What the server asked on those streams and the last page did not
    // answer: the streams resume after it, so this page's Client gets it here.
    const asked = Object.values(this.#saved.requests).flatMap((r) => Object.values(r.asked ?? {}));
    if (asked.length > 0) {
      queueMicrotask(() => {
        for (const message of asked) this.onmessage?.(/** @type {JSONRPCMessage} */ (message));
      });
    }
    // The session's own GET stream, which the SDK opens only after
    // `initialize` (server notifications and requests outside any call).
    this.#inner.resumeStream(/** @type {any} */ (undefined)).catch(() => {});
  }

  /**
   * Called by the Client. A request gets its own wire id (A); one of a
   * resumable session is kept in the store before it is POSTed, and its
   * stream's cursor in a tracker, until its answer arrives.
   * @param {JSONRPCMessage} message
   * @param {TransportSendOptions} [options]
   * @returns {Promise<void>}
   */
  async send(message, options) {
    // Messages leave in the order the Client sent them, although a request
    // waits for its record to be written first.
    const before = this.#sending;
    /** @type {() => void} */
    let ready = () => {};
    this.#sending = new Promise((resolve) => (ready = resolve));
    await before;
    if (!isRequest(message)) {
      ready();
      if (isResponse(message)) this.#answered(message.id);
      if (!Array.isArray(message) && 'method' in message && message.method === 'notifications/cancelled') {
        return this.#cancel(message, options);
      }
      return this.#inner.send(message, options);
    }
    try {
      return await this.#sendRequest(message, options, ready);
    } finally {
      ready();
    }
  }

  /**
   * @param {{ id: number | string, method: string, params?: any }} message
   * @param {TransportSendOptions | undefined} options
   * @param {() => void} ready Lets the next message go, once this one is on its way.
   */
  async #sendRequest(message, options, ready) {
    if (this.#reservedTo <= this.#nextWire) await this.#reserve();
    const wireId = this.#nextWire++;
    const clientId = message.id;
    /** @type {Live} */
    const live = { clientId, wireId, streamKey: '', tracker: undefined, opening: undefined, early: [] };
    const wire = { ...message, id: wireId };
    if (message.params?._meta?.progressToken === clientId) {
      wire.params = { ...message.params, _meta: { ...message.params._meta, progressToken: wireId } };
    }
    this.#byClient.set(clientId, live);
    this.#byWire.set(wireId, live);
    const saved = this.#keeping() ? this.#saved : undefined;
    if (saved) {
      live.streamKey = streamKey(this.#key, saved.sessionId, wireId);
      saved.requests[wireId] = { id: wireId, method: message.method, params: message.params };
      // The tracker opens while the request is on its way: its key is new,
      // so what arrives before it is open is fresh (bar repeats among
      // those), and it observes those ids once open.
      live.opening = openTracker(live.streamKey, this.#storeOptions).then((tracker) => {
        for (const id of live.early) tracker.observe(id);
        // Each was handed to the Client in its own task, before this.
        if (live.early.length > 0) tracker.commit();
        live.early = [];
        live.tracker = tracker;
        return tracker;
      });
      live.opening.catch((error) => this.onerror?.(error));
      // Kept from before it is sent (the write is queued ahead of the
      // POST): after a reload it is resumed or reported, never sent again.
      this.#save().catch((error) => this.onerror?.(error));
    }
    /** @type {TransportSendOptions} */
    const sendOptions = { ...options };
    if (live.opening) {
      sendOptions.onresumptiontoken = (token) => {
        // Cancelled or timed out while its stream goes on: nothing to keep.
        if (this.#byWire.get(live.wireId) !== live) return;
        // An event of another stream with an id and no message, whose
        // microtask has not run yet: handled.
        const previous = this.#event;
        if (previous?.fresh && previous.live !== live) this.#commit(previous.live);
        let fresh;
        if (live.tracker) {
          fresh = live.tracker.observe(token);
        } else {
          fresh = !live.early.includes(token);
          if (fresh) live.early.push(token);
        }
        if (!fresh) this.#replaysDropped++;
        const event = { live, fresh };
        this.#event = event;
        // An event with an id and no message (a priming event): nothing to
        // hand over, so it is handled.
        queueMicrotask(() => {
          if (this.#event !== event) return;
          this.#event = undefined;
          if (fresh) this.#commit(live);
        });
        if (fresh) options?.onresumptiontoken?.(token);
      };
    }
    const sent = this.#inner.send(/** @type {JSONRPCMessage} */ (/** @type {unknown} */ (wire)), sendOptions);
    ready();
    try {
      await sent;
    } catch (error) {
      // A POST cut because the transport closes stays kept: its fate is
      // for the next transport with the key to learn.
      if (!this.#closing) this.#finish(live);
      throw error;
    }
  }

  /**
   * Closes the connections. What is stored stays: a transport opened later
   * with the same key resumes the requests still in flight.
   * @returns {Promise<void>}
   */
  async close() {
    this.#closing = true;
    const closing = [...this.#resumed.values()].map((r) => r.source?.close());
    for (const live of this.#byWire.values()) closing.push(live.opening?.then((tracker) => tracker.close()));
    await this.#inner.close();
    await Promise.allSettled(closing);
    await this.#writes;
    this.#release();
  }

  /**
   * Ends the session at the server (HTTP DELETE) and forgets it here.
   * @returns {Promise<void>}
   */
  async terminateSession() {
    await this.#inner.terminateSession();
    await this.forget();
  }

  /**
   * Forgets what is stored under the key (the session and its requests in
   * flight), so that the next transport with it starts a new session.
   * @returns {Promise<void>}
   */
  async forget() {
    const saved = this.#saved;
    this.#saved = undefined;
    await this.#save();
    if (saved) await this.#forgetCursors(saved);
  }

  /**
   * Sets the protocol version (the Client calls it after `initialize`). A
   * new session is stored from here on, unless the server gave no session
   * id or speaks a revision without SSE resumability.
   * @param {string} version
   */
  setProtocolVersion(version) {
    this.#inner.setProtocolVersion(version);
    const sessionId = this.#inner.sessionId;
    if (version >= UNRESUMABLE_FROM || sessionId === undefined) {
      this.#notResumable(
        sessionId === undefined
          ? 'the server gave no session id'
          : `the server speaks MCP ${version}, which has no SSE resumability`,
      );
      return;
    }
    if (this.#saved?.sessionId === sessionId) {
      this.#saved.protocolVersion = version;
    } else {
      this.#saved = { url: this.#url, sessionId, protocolVersion: version, nextId: this.#reservedTo, requests: {} };
    }
    this.#resumable = true;
    this.#save().catch((error) => this.onerror?.(error));
  }

  /** Whether this page's requests are kept now. */
  #keeping() {
    return this.#resumable && this.#saved !== undefined && this.#saved.sessionId === this.#inner.sessionId;
  }

  /** @param {string} why */
  #notResumable(why) {
    this.#resumable = false;
    if (!this.#warned) {
      this.#warned = true;
      console.warn(`tidemark/mcp: ${why}: requests are not kept across reloads (the SDK transport as it is)`);
    }
    const saved = this.#saved;
    this.#saved = undefined;
    this.#save().then(() => saved && this.#forgetCursors(saved)).catch((error) => this.onerror?.(error));
  }

  /** Reserves the next block of request ids in the stored session (A). */
  #reserve() {
    this.#reserving ??= (async () => {
      this.#reservedTo = this.#nextWire + ID_BLOCK;
      if (this.#saved) {
        this.#saved.nextId = this.#reservedTo;
        await this.#save();
      }
    })().finally(() => (this.#reserving = undefined));
    return this.#reserving;
  }

  /** Writes the stored session (or deletes it), after the writes before. */
  #save() {
    const value = this.#saved === undefined ? undefined : structuredClone(this.#saved);
    const write = this.#writes.then(() => this.#store.put(this.#key, value));
    this.#writes = write.catch(() => {});
    return write;
  }

  /** @param {Saved} saved */
  async #forgetCursors(saved) {
    await Promise.allSettled(
      Object.values(saved.requests).map((r) => forgetStream(streamKey(this.#key, saved.sessionId, r.id), this.#storeOptions)),
    );
  }

  /** @param {Live} live */
  #commit(live) {
    try {
      live.tracker?.commit();
    } catch {
      // Closed meanwhile: the request was answered.
    }
  }

  /**
   * A message from the SDK transport: a replay is dropped (E), an answer or
   * progress of this page's request gets the Client's id back (A), one of
   * an earlier page's request goes to its pending entry (B).
   * @param {JSONRPCMessage} message
   */
  #receive(message) {
    let event = this.#event;
    this.#event = undefined;
    const owner = this.#owner(message);
    if (event && owner && owner !== event.live) {
      // The event before was another stream's, with no message: handled.
      if (event.fresh) this.#commit(event.live);
      event = undefined;
    }
    if (event && !event.fresh) return;
    // Kept until the Client answers: the cursor passes it now.
    if (event?.fresh && isRequest(message)) this.#ask(event.live.wireId, message);
    this.onmessage?.(owner ? this.#toClient(message, owner) : message);
    if (event?.fresh) this.#commit(event.live);
    if (owner && isResponse(message)) this.#finish(owner);
  }

  /**
   * This page's request that a message answers or reports progress of, by
   * its wire id.
   * @param {any} message
   * @returns {Live | undefined}
   */
  #owner(message) {
    let id;
    if (isResponse(message) && !('method' in message)) id = message.id;
    else if (message?.method === 'notifications/progress') id = message.params?.progressToken;
    return typeof id === 'number' ? this.#byWire.get(id) : undefined;
  }

  /**
   * @param {any} message
   * @param {Live} live
   * @returns {JSONRPCMessage}
   */
  #toClient(message, live) {
    if (isResponse(message) && message.id === live.wireId) return /** @type {any} */ ({ ...message, id: live.clientId });
    if (message.method === 'notifications/progress' && message.params?.progressToken === live.wireId) {
      return { ...message, params: { ...message.params, progressToken: live.clientId } };
    }
    return message;
  }

  /**
   * The Client cancelled a request: the notification names its wire id,
   * and the request is no longer kept.
   * @param {any} message
   * @param {TransportSendOptions} [options]
   */
  async #cancel(message, options) {
    const live = this.#byClient.get(message.params?.requestId);
    // The SDK also cancels requests already answered (an abort signal
    // fired later): their ids are no longer on the wire, and as sent the
    // Client's id could name another page's request.
    if (!live) return;
    try {
      await this.#inner.send({ ...message, params: { ...message.params, requestId: live.wireId } }, options);
    } finally {
      this.#finish(live);
    }
  }

  /**
   * This page's request is answered (or failed, or was cancelled): it is
   * no longer kept, and its cursor is forgotten.
   * @param {Live} live
   */
  #finish(live) {
    if (this.#byWire.get(live.wireId) !== live) return;
    this.#byWire.delete(live.wireId);
    this.#byClient.delete(live.clientId);
    const saved = this.#saved;
    if (saved?.requests[live.wireId]) {
      delete saved.requests[live.wireId];
      this.#save().catch((error) => this.onerror?.(error));
    }
    this.#commit(live);
    live.opening
      ?.then((tracker) => tracker.close())
      .then(() => forgetStream(live.streamKey, this.#storeOptions))
      .catch((error) => this.onerror?.(error));
  }

  /**
   * @param {SavedRequest} record
   * @param {string | undefined} cursor
   * @returns {Resumed}
   */
  #pendingOf(record, cursor) {
    /** @type {(ok: boolean, value: any) => void} */
    let settle = () => {};
    const result = new Promise((resolve, reject) => {
      settle = (ok, value) => (ok ? resolve(value) : reject(value));
    });
    result.catch(() => {}); // a rejection the app never looks at is not "unhandled"
    /** @type {Resumed} */
    const pending = {
      id: record.id,
      wireId: record.id,
      method: record.method,
      params: record.params,
      resumedFrom: cursor,
      result,
      streamKey: streamKey(this.#key, /** @type {Saved} */ (this.#saved).sessionId, record.id),
      settle,
      held: [],
      handler: null,
      done: false,
      cancel: (reason) => this.#cancelResumed(pending, reason),
      get onprogress() {
        return this.handler;
      },
      set onprogress(handler) {
        this.handler = handler;
        while (handler && this.held.length > 0) handler(/** @type {Progress} */ (this.held.shift()));
      },
    };
    return pending;
  }

  /**
   * Resumes an earlier page's request from its stored cursor (C): a
   * ResumableEventSource on the endpoint, with the session's headers.
   * @param {Resumed} pending
   */
  async #resume(pending) {
    try {
      if (pending.resumedFrom === undefined) {
        // In a later task: an app that reads pending() right after
        // connect still finds it there, and hears why.
        await new Promise((resolve) => setTimeout(resolve, 0));
        throw new Error(
          `tidemark/mcp: ${pending.method} (request ${pending.id}) was in flight when the page went away, ` +
            'before its answer carried an event id: it cannot be resumed, and is not sent again',
        );
      }
      /** @type {Record<string, string>} */
      const headers = {};
      new Headers(this.#options.requestInit?.headers).forEach((value, name) => (headers[name] = value));
      const tokens = await this.#options.authProvider?.tokens();
      if (tokens) headers.authorization = `Bearer ${tokens.access_token}`;
      headers['mcp-session-id'] = /** @type {string} */ (this.#inner.sessionId);
      headers['mcp-protocol-version'] = /** @type {string} */ (this.#inner.protocolVersion);
      /** @type {import('./index.js').ResumableEventSourceOptions} */
      const sourceOptions = { streamKey: pending.streamKey, headers };
      if (this.#storeOptions.store) sourceOptions.store = this.#storeOptions.store;
      if (this.#storeOptions.database) sourceOptions.database = this.#storeOptions.database;
      if (this.#options.fetch) sourceOptions.fetch = /** @type {any} */ (this.#options.fetch);
      if (this.#options.requestInit?.credentials) sourceOptions.credentials = this.#options.requestInit.credentials;
      if (this.#options.reconnect) sourceOptions.reconnect = this.#options.reconnect;
      this.#connect(pending, sourceOptions, 0);
    } catch (error) {
      this.#fail(pending, error instanceof Error ? error : new Error(String(error)));
    }
  }

  /**
   * Reads an earlier page's request from its stored cursor. A `409` (the
   * server still holds the old page's connection to the stream) is tried
   * again, 250 ms later and doubling, for about a minute.
   * @param {Resumed} pending
   * @param {import('./index.js').ResumableEventSourceOptions} sourceOptions
   * @param {number} conflicts `409`s so far.
   */
  #connect(pending, sourceOptions, conflicts) {
    if (pending.done || this.#closing) return;
    const source = new ResumableEventSource(this.#url, sourceOptions);
    pending.source = source;
    source.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        this.onerror?.(new Error(`tidemark/mcp: a resumed stream sent an event that is not JSON: ${event.data.slice(0, 200)}`));
        return;
      }
      this.#deliverResumed(pending, message);
    };
    source.onerror = (event) => {
      if (source.readyState !== ResumableEventSource.CLOSED || pending.done || this.#closing) return;
      if (event.code === 404) return this.#sessionGone();
      if (event.code === 409 && conflicts < MAX_CONFLICTS) {
        const delay = Math.min(250 * 2 ** conflicts, 8_000);
        // Its cursor is written once closed; the next one starts from it.
        source.close().then(() => setTimeout(() => this.#connect(pending, sourceOptions, conflicts + 1), delay));
        return;
      }
      this.#fail(pending, new Error(`tidemark/mcp: resuming ${pending.method} (request ${pending.id}) failed: ${event.message}`));
    };
  }

  /**
   * A message of an earlier page's request: its answer settles `result`,
   * its progress goes to `onprogress`, anything else (a server's request
   * or notification) to the Client.
   * @param {Resumed} pending
   * @param {any} message
   */
  #deliverResumed(pending, message) {
    if (pending.done) return;
    if (isResponse(message) && message.id === pending.wireId && !('method' in message)) {
      this.#end(pending);
      if ('error' in message) {
        pending.settle(false, new McpError(message.error.code, message.error.message, message.error.data));
      } else {
        pending.settle(true, message.result);
      }
    } else if (message?.method === 'notifications/progress' && message.params?.progressToken === pending.wireId) {
      const { progressToken: _, ...progress } = message.params;
      if (pending.handler) pending.handler(progress);
      else pending.held.push(progress);
    } else {
      if (isRequest(message)) this.#ask(pending.wireId, message);
      this.onmessage?.(message);
    }
  }

  /**
   * A server's request on the stream of request `wireId`: kept with it
   * until the Client answers, so that a page reloaded before the answer
   * hands it to its own Client (the stream resumes after it).
   * @param {number} wireId
   * @param {{ id: number | string }} message
   */
  #ask(wireId, message) {
    const record = this.#saved?.requests[wireId];
    if (!record) return;
    record.asked = { ...record.asked, [String(message.id)]: message };
    this.#save().catch((error) => this.onerror?.(error));
  }

  /**
   * The Client answered the server's request `id`: it is no longer kept.
   * @param {number | string} id
   */
  #answered(id) {
    for (const record of Object.values(this.#saved?.requests ?? {})) {
      if (record.asked?.[String(id)] === undefined) continue;
      delete record.asked[String(id)];
      this.#save().catch((error) => this.onerror?.(error));
    }
  }

  /**
   * The app gives up an earlier page's request: the server is told
   * (`notifications/cancelled`), and it is no longer kept.
   * @param {Resumed} pending
   * @param {string | undefined} reason
   */
  async #cancelResumed(pending, reason) {
    if (pending.done) return;
    this.#fail(pending, new Error(`tidemark/mcp: ${pending.method} (request ${pending.id}) cancelled${reason ? `: ${reason}` : ''}`));
    await this.#inner.send({
      jsonrpc: '2.0',
      method: 'notifications/cancelled',
      params: { requestId: pending.wireId, ...(reason ? { reason } : {}) },
    });
  }

  /**
   * @param {Resumed} pending
   * @param {Error} error
   */
  #fail(pending, error) {
    if (pending.done) return;
    this.#end(pending);
    pending.settle(false, error);
  }

  /**
   * An earlier page's request is over: it is no longer kept, and its
   * cursor is forgotten once its stream is closed.
   * @param {Resumed} pending
   */
  #end(pending) {
    pending.done = true;
    const saved = this.#saved;
    if (saved?.requests[pending.wireId]) {
      delete saved.requests[pending.wireId];
      this.#save().catch((error) => this.onerror?.(error));
    }
    const source = pending.source;
    // As of its latest event: the answer, after which nothing counts.
    this.#replaysDropped += source?.stats().duplicates ?? 0;
    Promise.resolve(source?.close())
      .then(() => forgetStream(pending.streamKey, this.#storeOptions))
      .catch((error) => this.onerror?.(error));
  }

  /**
   * The server answered 404 to a request with the session id: the session
   * is gone. The resumed requests fail, and nothing of it is kept.
   */
  #sessionGone() {
    const saved = this.#saved;
    if (!saved) return;
    const error = new Error(
      `tidemark/mcp: the server no longer knows session ${saved.sessionId} (404): ` +
        'its requests in flight cannot be resumed; open a new transport to start a new session',
    );
    for (const pending of this.#resumed.values()) this.#fail(pending, error);
    this.#saved = undefined;
    this.#resumable = false;
    this.#save()
      .then(() => this.#forgetCursors(saved))
      .catch(() => {});
    this.onerror?.(error);
  }
}

/**
 * Makes the SDK's Streamable HTTP client transport for `url`, resumable
 * across reloads under `key`: give it to `client.connect`. With a session
 * stored under `key`, it reconnects to that session (the Client skips
 * `initialize`) and resumes each request the last page left in flight
 * from its cursor, a GET with `Last-Event-ID`; `transport.pending()` lists
 * them. A request is never sent twice.
 *
 * ```js
 * const transport = await resumableTransport('/mcp', { key: 'my-app' });
 * await client.connect(transport);
 * for (const call of transport.pending()) {
 *   call.onprogress = showProgress;
 *   call.result.then(showResult, showError);
 * }
 * ```
 *
 * @param {string | URL} url The MCP endpoint, relative to the page.
 * @param {ResumableTransportOptions} options
 * @returns {Promise<ResumableTransport>}
 */
export async function resumableTransport(url, options) {
  if (typeof options?.key !== 'string' || options.key === '') {
    throw new TypeError('tidemark/mcp: resumableTransport(url, { key }) needs a key (a non-empty string)');
  }
  const href = new URL(url, globalThis.location?.href).href;
  const database = `${options.database ?? 'tidemark'}-mcp`;
  const release = await holdKey(`tidemark/mcp ${database} ${options.key}`, options.key);
  try {
    const store = await SessionStore.open(options.store ?? 'indexeddb', database);
    let saved = await store.get(options.key);
    if (saved && saved.url !== href) {
      // The key was used for another endpoint: what it kept is not this one's.
      saved = undefined;
      await store.put(options.key, undefined);
    }
    /** @type {Map<number, string | undefined>} */
    const cursors = new Map();
    if (saved) {
      // This page's block of request ids (A), reserved before any is used.
      saved.nextId += ID_BLOCK;
      await store.put(options.key, saved);
      const storeOptions = { store: options.store, database: options.database };
      for (const { id } of Object.values(saved.requests)) {
        const tracker = await openTracker(streamKey(options.key, saved.sessionId, id), storeOptions);
        cursors.set(id, tracker.lastEventId);
        await tracker.close();
      }
    }
    return new ResumableTransport(href, options, store, saved, cursors, release);
  } catch (error) {
    release();
    throw error;
  }
}
