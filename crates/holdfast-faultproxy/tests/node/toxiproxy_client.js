// Drives a fault proxy through the npm Toxiproxy client (toxiproxy-node-client), the way an
// application's test suite would. One JSON command per stdin line, one JSON answer per stdout
// line: {"ok": result} or {"error": message}. Used by tests/toxiproxy_client.rs.
"use strict";
const readline = require("node:readline");
const { Toxiproxy } = require("toxiproxy-node-client");

const toxiproxy = new Toxiproxy(process.argv[2]);

const ops = {
  version: () => toxiproxy.getVersion(),
  createProxy: async ({ body }) => (await toxiproxy.createProxy(body)).toJson(),
  updateProxy: async ({ name, changes }) => {
    const proxy = await toxiproxy.get(name);
    return (await proxy.update({ ...proxy.toJson(), ...changes })).toJson();
  },
  addToxic: async ({ proxy, body }) =>
    (await (await toxiproxy.get(proxy)).addToxic(body)).toJson(),
  removeToxic: async ({ proxy, name }) => {
    const toxic = await (await toxiproxy.get(proxy)).getToxic(name);
    await toxic.remove();
    return null;
  },
  getAll: async () => {
    const proxies = await toxiproxy.getAll();
    return Object.fromEntries(Object.entries(proxies).map(([name, p]) => [name, p.toJson()]));
  },
  reset: async () => {
    await toxiproxy.reset();
    return null;
  },
};

(async () => {
  for await (const line of readline.createInterface({ input: process.stdin })) {
    const { op, ...args } = JSON.parse(line);
    try {
      console.log(JSON.stringify({ ok: (await ops[op](args)) ?? null }));
    } catch (e) {
      console.log(JSON.stringify({ error: String((e && e.message) || e) }));
    }
  }
})();
