// An in-memory `EventStore` for the MCP SDK's StreamableHTTPServerTransport
// (@modelcontextprotocol/sdk 1.32.2, server/webStandardStreamableHttp.js),
// with ids a resuming client can trust:
//
// - per stream and monotonic: `<stream>.<seq>`, where <stream> is a small
//   number this store gives each SDK stream id (so ids never contain the SDK's
//   ids, and `_GET_stream` is a stream like any other) and <seq> counts that
//   stream's events from 1, zero-padded so ids also sort as strings;
// - replay sends the events of the id's stream strictly after it, in order,
//   including events stored while the replay runs.
//
// The SDK's example store (examples/shared/inMemoryEventStore.js) gets both
// wrong: its `_` separator is also in `_GET_stream`, and it orders by
// timestamp strings with a random suffix.
//
// `getStreamIdForEventId` is deliberately not implemented: with it the SDK
// answers 409 to a resume that arrives while the server still holds the old
// connection of that stream (a reload races the server noticing the aborted
// fetch), and the 1.32.2 client gives up on a 409 during a resume. Without
// it the SDK closes the old connection and registers the new one.
//
// `replay: 'inclusive'` re-sends the event named by Last-Event-ID as well: an
// at-least-once server, for tests of a client's duplicate detection.

const PAD = 9;

export class MonotonicEventStore {
  /** @param {{ replay?: 'after' | 'inclusive' }} [options] */
  constructor(options = {}) {
    this.inclusive = options.replay === 'inclusive';
    /** SDK stream id -> { index, events: [{ id, message }] } */
    this.streams = new Map();
    /** store stream index -> SDK stream id */
    this.byIndex = [];
  }

  /** @param {string} streamId */
  #stream(streamId) {
    let stream = this.streams.get(streamId);
    if (!stream) {
      stream = { index: this.byIndex.length, events: [] };
      this.streams.set(streamId, stream);
      this.byIndex.push(streamId);
    }
    return stream;
  }

  /**
   * @param {string} streamId
   * @param {unknown} message
   * @returns {Promise<string>}
   */
  async storeEvent(streamId, message) {
    const stream = this.#stream(streamId);
    const id = `${stream.index}.${String(stream.events.length + 1).padStart(PAD, '0')}`;
    stream.events.push({ id, message });
    return id;
  }

  /**
   * Parses an id of this store: `{ streamId, seq }`, or undefined.
   * @param {string} eventId
   */
  parse(eventId) {
    const match = /^(\d+)\.(\d+)$/.exec(eventId);
    if (!match) return undefined;
    const streamId = this.byIndex[Number(match[1])];
    const seq = Number(match[2]);
    const stream = streamId === undefined ? undefined : this.streams.get(streamId);
    if (!stream || seq < 1 || seq > stream.events.length) return undefined;
    return { streamId, stream, seq };
  }

  /**
   * Sends the events of `lastEventId`'s stream after it (events are numbered
   * from 1, so event `seq` is at index seq - 1) and returns the SDK stream id.
   * @param {string} lastEventId
   * @param {{ send: (eventId: string, message: unknown) => Promise<void> }} sink
   * @returns {Promise<string>}
   */
  async replayEventsAfter(lastEventId, { send }) {
    const found = this.parse(lastEventId);
    if (!found) throw new Error(`unknown event id ${JSON.stringify(lastEventId)}`);
    const { stream, streamId } = found;
    // The live array: events stored while `send` awaits are sent too.
    for (let i = this.inclusive ? found.seq - 1 : found.seq; i < stream.events.length; i++) {
      const { id, message } = stream.events[i];
      // The SDK stores `{}` for a priming event (empty data); replaying it
      // would send `data: {}`, which is no JSON-RPC message.
      if (message && typeof message === 'object' && Object.keys(message).length === 0) continue;
      await send(id, message);
    }
    return streamId;
  }
}
