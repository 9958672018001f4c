// The peer of the throughput bench: Node's `eventsource` package (npm,
// pinned in the root package.json) reading one stream and printing each
// event as a JSON line on stdout, as `tidemark follow` does. Exits after
// COUNT events.
//
//   node host-native/benches/eventsource_peer.mjs URL COUNT
import { EventSource } from 'eventsource';

const [url, countArg] = process.argv.slice(2);
const count = Number(countArg);
let seen = 0;
const source = new EventSource(url);
source.onmessage = (event) => {
  process.stdout.write(
    JSON.stringify({ id: event.lastEventId, event: event.type, data: event.data }) + '\n',
  );
  seen += 1;
  if (seen === count) {
    source.close();
    process.stdout.end(() => process.exit(0));
  }
};
source.onerror = (error) => {
  if (seen < count) process.stderr.write(`eventsource: ${error.message ?? 'error'}\n`);
};
