// The JS NATS client (npm `nats`), driven by tests/clients: it connects through the callout
// with an nkey seed file and prints what happens as JSON lines on stdout, one event per line.
//
//   node client.js URL SEEDFILE connect            connect, then close (exit 1 if refused)
//   node client.js URL SEEDFILE publish SUBJECT    publish once, report the server's error
//   node client.js URL SEEDFILE stay               stay connected until closed for good
"use strict";

const fs = require("fs");
const { connect, nkeyAuthenticator } = require("nats");

function emit(event, fields) {
  console.log(JSON.stringify({ event, ...(fields || {}) }));
}

// A timer that does not keep node running once the client is closed.
function after(ms) {
  return new Promise((resolve) => setTimeout(() => resolve("timeout"), ms).unref());
}

function text(err) {
  return err ? String(err.message || err) : "";
}

async function main() {
  const [url, seedFile, command, subject] = process.argv.slice(2);
  const seed = new TextEncoder().encode(fs.readFileSync(seedFile, "utf8").trim());
  let nc;
  try {
    nc = await connect({
      servers: url,
      name: "nats.js-client-test",
      authenticator: nkeyAuthenticator(seed),
      maxReconnectAttempts: 2,
      reconnectTimeWait: 100,
    });
  } catch (err) {
    emit("connect_failed", { error: text(err), code: err.code || "" });
    process.exitCode = 1;
    return;
  }
  emit("connected", { server: nc.info ? nc.info.server_id : "" });
  const errors = [];
  let errorSeen;
  const gotError = new Promise((resolve) => (errorSeen = resolve));
  (async () => {
    for await (const status of nc.status()) {
      if (status.type === "error") {
        // nats.js reports the server's -ERR by its code (PERMISSIONS_VIOLATION, ...).
        emit("async_error", { error: text(status.data) });
        errors.push(status.data);
        errorSeen();
      } else if (status.type === "disconnect") {
        emit("disconnected", {});
      } else if (status.type === "reconnect") {
        emit("reconnected", {});
      }
    }
  })();
  const closed = nc.closed().then((err) => emit("closed", { last_error: text(err) }));
  if (command === "connect") {
    await nc.close();
  } else if (command === "publish") {
    nc.publish(subject, new TextEncoder().encode("hello"));
    await nc.flush().catch((err) => emit("flush_failed", { error: text(err) }));
    // The server's -ERR for a refused publish may trail the flush's PONG.
    if ((await Promise.race([gotError, after(5000)])) === "timeout") emit("no_error", {});
    await nc.close();
  } else if (command === "stay") {
    if ((await Promise.race([closed, after(60000)])) === "timeout") {
      emit("still_connected", {});
      await nc.close();
    }
  }
  await closed;
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 2;
});
