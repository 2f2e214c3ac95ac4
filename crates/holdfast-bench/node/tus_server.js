// The peer of `holdfast bench uploads`: @tus/server with its file store, as its README sets it
// up, on 127.0.0.1. Prints `LISTENING <port>` once it accepts connections.
//   node tus_server.js DIR PORT
const http = require('http');
const { Server } = require('@tus/server');
const { FileStore } = require('@tus/file-store');

const [directory, port] = process.argv.slice(2);
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) });
const server = http.createServer((req, res) => tus.handle(req, res));
server.listen(Number(port), '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});
