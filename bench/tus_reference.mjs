// The reference for bench/ingest.py: the official tus Node.js server (@tus/server with
// @tus/file-store, as its README sets it up), on loopback, with its files in a folder the
// benchmark picks (on the same disk as the portal's staging folder).
//
//   node bench/tus_reference.mjs PORT DIRECTORY
//
// Serves tus at /tus/ (the portal's path, so that the same nginx config can sit in front of
// it). Behind nginx it builds its Location headers from X-Forwarded-Proto and Host, as the
// portal does. Prints "tus reference listening on http://127.0.0.1:PORT" once it listens.
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const [port, directory] = process.argv.slice(2);
if (!port || !directory) {
  console.error("usage: node bench/tus_reference.mjs PORT DIRECTORY");
  process.exit(2);
}
const server = new Server({
  path: "/tus",
  datastore: new FileStore({ directory }),
  respectForwardedHeaders: true,
});
const listener = server.listen({ host: "127.0.0.1", port: Number(port) }, () => {
  console.log(`tus reference listening on http://127.0.0.1:${listener.address().port}`);
});
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => listener.close(() => process.exit(0)));
}
