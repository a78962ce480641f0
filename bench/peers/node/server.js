// The Node peer: socket.io with @socket.io/redis-adapter, its documented
// set-up, serving the same chat shape as chat-api: a client joins the room
// named by the `room` query parameter; a "message" event is stamped (id,
// sender, ms timestamp), emitted to the whole room (sender included) on every
// pod, and acknowledged with the message id.
//
//   node server.js --port 8002 --redis redis://127.0.0.1:6379/0 --pod-id node1
"use strict";

const http = require("http");
const crypto = require("crypto");
const { Server } = require("socket.io");
const { createClient } = require("redis");
const { createAdapter } = require("@socket.io/redis-adapter");

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

async function main() {
  const port = Number(arg("port"));
  const redisUrl = arg("redis");
  const podId = arg("pod-id", "node");
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, { adapter: createAdapter(pubClient, subClient) });
  const prefix = `${podId}-${crypto.randomBytes(3).toString("hex")}`;
  let next = 0;

  io.on("connection", (socket) => {
    const room = String(socket.handshake.query.room || "general");
    socket.join(room);
    socket.on("message", (payload, ack) => {
      const id = `${prefix}-${(++next).toString(16)}`;
      io.to(room).emit("message", {
        room,
        id,
        from: socket.id,
        ts: Date.now(),
        data: payload ? payload.data : null,
      });
      if (typeof ack === "function") ack({ id });
    });
  });

  const stop = () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  httpServer.listen(port, "127.0.0.1");
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
