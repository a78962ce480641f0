// chat-client.js: the connection logic of chat-api's web page, as an ES
// module of its own (no build step, no dependencies). The reference is
// docs/client-js.md; the wire protocol it speaks is docs/protocol.md.
//
// What it does for its caller:
// - connects, and after a lost connection reconnects by itself with capped,
//   jittered exponential backoff, resuming every room where it left off
//   (`since`/`epoch`): the caller sees each room message once, in offset
//   order, even across pod restarts (deduplicated by room, epoch and offset);
// - keeps every message sent until the server acknowledges it, and sends
//   the unacknowledged ones again, with their keys, after a reconnect (the
//   server stores a key's message once);
// - says when something could not be recovered (`unrecoverable`), and when
//   it will not reconnect by itself (`closed`: close code 1008 or 4000-4999,
//   HTTP 401/403 before the upgrade, or close());
// - given a token source (an async function), fetches a fresh token for
//   every connection and refreshes it (a `refresh` frame) shortly before
//   it expires.
//
// It never touches the page: the caller decides what to show.

/** Default settings; every one can be given to the constructor. */
export const DEFAULTS = Object.freeze({
  path: "/api/chat-api/ws",
  history: 0, // recent messages asked for when first entering a room
  maxPending: 1000, // messages kept until acknowledged; more are refused
  backoffBaseMs: 500,
  backoffCapMs: 15000,
  pingIntervalMs: 25000, // a ping after this much silence from the server
  pongTimeoutMs: 10000, // no frame this long after it: the connection is dead
  refreshMarginMs: 30000, // refresh the token this long before it expires (at most half its life)
});

/** Close codes after which the client does not reconnect by itself. */
export function isFinalClose(code) {
  return code === 1008 || (code >= 4000 && code <= 4999);
}

/** An error of the client or of the server, with a `code`: the server's
 * error code (`rate_limited`, `forbidden_room`, ...) when `server` is true,
 * else one of the client's own (docs/client-js.md, "Errors"). */
export class ChatError extends Error {
  constructor(code, message, { server = false, frame = null } = {}) {
    super(message);
    this.name = "ChatError";
    this.code = code;
    this.server = server;
    this.frame = frame;
  }
}

/** A random message key: a UUID where the page is a secure context, else
 * 128 random bits in hex (crypto.getRandomValues works everywhere). */
export function newKey() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The `exp` claim of a JWT (seconds), or null. Read, not verified: the
 * server verifies; this only decides when to refresh. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

/** The delay before reconnect attempt `attempt` (0, 1, 2, ...): a random time
 * between half and all of min(cap, base * 2^attempt) ("equal jitter"), so a
 * pod restart does not bring every client back in the same millisecond. */
export function backoffDelay(attempt, baseMs = DEFAULTS.backoffBaseMs, capMs = DEFAULTS.backoffCapMs) {
  const ceiling = Math.min(capMs, baseMs * 2 ** attempt);
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

const MAX_UNSTAMPED_IDS = 1000;

function defaultUrl(path) {
  const here = globalThis.location;
  if (!here || !here.host) throw new TypeError("ChatClient: give `url` outside a web page");
  return `${here.protocol === "https:" ? "wss:" : "ws:"}//${here.host}${path}`;
}

/**
 * A chat-api connection that keeps itself alive. Events (an EventTarget;
 * each event's `detail` is described in docs/client-js.md): `connecting`,
 * `connected`, `reconnecting`, `reconnected`, `closed`, `message`, `stored`,
 * `ack`, `sync`, `unrecoverable`, `member_joined`, `member_left`,
 * `presence`, `left`, `refreshed`, `error`, `frame`.
 */
export class ChatClient extends EventTarget {
  #opts;
  #WebSocket;
  #fetch;
  #rooms = new Map(); // room -> {epoch, offset, known, resumable, catchup, history, waiters}
  #pending = new Map(); // ref -> an own message not yet acknowledged (in send order)
  #requests = new Map(); // ref -> {kind, room, token, resolve, reject}: join, leave, presence, refresh
  #unstamped = new Set(); // ids of room messages delivered without an offset
  #connectWaiters = [];
  #nextRef = 1;
  #ws = null; // the current socket; events of any other one are ignored
  #urlRoom = null; // the room in the current socket's URL
  #gen = 0; // bumped whenever the current connection attempt is abandoned
  #state = "idle";
  #ended = false; // close() was called
  #fresh = true; // the next welcome is the first of a connect() call
  #welcomed = false;
  #attempt = 0;
  #retryTimer = 0;
  #watchTimer = 0;
  #refreshTimer = 0;
  #lastFrameAt = 0;
  #pinged = false;
  #token;
  #currentToken = "";
  #expiresAt = null;
  #welcome = null;
  #stats = { duplicates: 0, resent: 0, reconnects: 0 };

  /**
   * @param {object} options
   * @param {string} [options.url] the WebSocket endpoint without a room (default: this page's host + `/api/chat-api/ws`)
   * @param {string} [options.room] the room to be in (or `rooms`, several; none: the global channel)
   * @param {string[]} [options.rooms]
   * @param {string} [options.name] display name for guests (servers without sign-in)
   * @param {string|(() => Promise<string>|string)} [options.token] a JWT, or a token source called for every connection and before expiry
   * @param {number} [options.history] recent messages asked for when first entering a room
   */
  constructor(options = {}) {
    super();
    this.#opts = { ...DEFAULTS, ...options };
    this.#opts.url = options.url ?? defaultUrl(this.#opts.path);
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.name = options.name ?? "";
    this.#token = options.token ?? "";
    const rooms = options.rooms ?? (options.room ? [options.room] : []);
    for (const room of rooms) this.#rooms.set(room, this.#newRoom(this.#opts.history));
  }

  // -- what the caller can read ----------------------------------------------

  /** `idle`, `connecting`, `live`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The rooms the client is in (or will be in once connected). */
  get rooms() {
    return [...this.#rooms.keys()];
  }

  /** The last welcome frame (`user`, `pod`, `limits`, ...), or null. */
  get welcome() {
    return this.#welcome;
  }

  get user() {
    return this.#welcome?.user ?? null;
  }

  get limits() {
    return this.#welcome?.limits ?? { max_message_bytes: 65536, max_rooms: 10 };
  }

  /** When the connection's token expires (Unix seconds), or null. */
  get expiresAt() {
    return this.#expiresAt;
  }

  /** Messages sent (or queued) and not yet acknowledged. */
  get pending() {
    return this.#pending.size;
  }

  /** Where a room resumes from: `{epoch, offset}` of the last message seen. */
  position(room) {
    const r = this.#rooms.get(room);
    return r ? { epoch: r.epoch, offset: r.offset } : null;
  }

  /** Counters: `duplicates` dropped, messages `resent`, `reconnects`. */
  get stats() {
    return { ...this.#stats };
  }

  /** The token for the next connection: a string or a token source. */
  set token(value) {
    this.#token = value ?? "";
  }

  // -- the connection ----------------------------------------------------------

  /** Connect (or, if connected, connect again now, resuming). Resolves with
   * the welcome frame; rejects with a ChatError if the server refuses for
   * good before that. Reconnects after losses by itself meanwhile. */
  connect() {
    if (this.#ended) return Promise.reject(new ChatError("closed", "this client was closed"));
    const waiter = new Promise((resolve, reject) => this.#connectWaiters.push({ resolve, reject }));
    this.#drop("connecting again");
    this.#fresh = true;
    this.#attempt = 0;
    this.#setState("connecting");
    this.#open();
    return waiter;
  }

  /** Close the connection and do not reconnect; rooms, positions and
   * unacknowledged messages are kept for the next connect(). */
  disconnect() {
    this.#drop("disconnected");
    this.#setState("idle");
  }

  /** Close for good: every unacknowledged message and open request is
   * rejected (ChatError `closed`). */
  close() {
    if (this.#ended) return;
    this.#ended = true;
    this.#drop("closed");
    const error = new ChatError("closed", "the client was closed");
    for (const entry of this.#pending.values()) entry.reject(error);
    this.#pending.clear();
    for (const r of this.#rooms.values()) this.#settleJoin(r, error);
    this.#rejectConnect(error);
    this.#stop({ code: 1000, reason: "closed by the caller", byCaller: true });
  }

  /** While waiting to reconnect: try now (a button, the `online` event). */
  reconnectNow() {
    if (this.#state !== "reconnecting" || this.#ws !== null) return;
    clearTimeout(this.#retryTimer);
    this.#open();
  }

  // -- rooms and messages --------------------------------------------------------

  /** Enter `room` (with `history` recent messages the first time). Resolves
   * once the room is live for this client. */
  join(room, { history = this.#opts.history } = {}) {
    let r = this.#rooms.get(room);
    if (r === undefined) {
      r = this.#newRoom(history);
      this.#rooms.set(room, r);
      if (this.#live()) this.#sendJoin(room, r);
    } else if (r.joined) {
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => r.waiters.push({ resolve, reject }));
  }

  /** Leave `room`: its unacknowledged messages are rejected (`left`). */
  leave(room) {
    const r = this.#rooms.get(room);
    if (r === undefined) return Promise.resolve();
    this.#forget(room, new ChatError("left", `left room ${room}`));
    if (!this.#live()) return Promise.resolve();
    return this.#request({ type: "leave", room }, "leave", room);
  }

  /**
   * Send `data` to `room` (default: the first room; none: everyone).
   * Resolves with the server's ack (`id`, `room`, `offset`, `epoch`,
   * `duplicate`, ...) plus the message's `key`; an ack with `offset: null`
   * says the server could not confirm it was stored: send again with the
   * same key to be sure. Rejects with a ChatError.
   */
  send(data, { room = this.rooms[0] ?? null, key = newKey() } = {}) {
    if (this.#ended) return Promise.reject(new ChatError("closed", "this client was closed"));
    if (room !== null && !this.#rooms.has(room)) {
      return Promise.reject(new ChatError("not_in_room", `join room ${room} before sending to it`));
    }
    if (this.#pending.size >= this.#opts.maxPending) {
      return Promise.reject(
        new ChatError("queue_full", `${this.#opts.maxPending} messages are already waiting`),
      );
    }
    const ref = this.#nextRef++;
    const frame = { type: "message", data, ref, key };
    if (room !== null) frame.room = room;
    const text = JSON.stringify(frame);
    const size = new TextEncoder().encode(text).length;
    const limit = this.limits.max_message_bytes;
    if (size > limit) {
      return Promise.reject(
        new ChatError("too_large", `the message is ${size} bytes; the server takes up to ${limit}`),
      );
    }
    return new Promise((resolve, reject) => {
      const entry = { ref, key, room, text, sent: false, resolve, reject };
      this.#pending.set(ref, entry);
      if (this.#live()) this.#transmit(entry);
    });
  }

  /** Who is in `room`, on every pod: resolves with the member list. */
  presence(room) {
    if (!this.#live()) return Promise.reject(new ChatError("not_connected", "not connected"));
    return this.#request({ type: "presence", room }, "presence", room);
  }

  // -- inside ---------------------------------------------------------------------

  #newRoom(history) {
    return {
      epoch: null,
      offset: 0,
      known: false, // is the position known (a sync or a stamped message seen)?
      resumable: false, // joined once: later joins resume instead of asking for history
      joined: false,
      catchup: null, // what the current join asked for: "history", "resume", then "live"
      history,
      waiters: [],
    };
  }

  #dispatch(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #setState(state) {
    this.#state = state;
  }

  #live() {
    return this.#state === "live" && this.#ws !== null && this.#welcomed;
  }

  #catchup(r) {
    if (r.resumable) {
      r.catchup = "resume";
      return r.epoch === null ? { since: r.offset } : { since: r.offset, epoch: r.epoch };
    }
    r.catchup = "history";
    return { history: r.history };
  }

  #socketUrl(token) {
    const query = new URLSearchParams();
    if (this.name) query.set("name", this.name);
    if (token) query.set("access_token", token);
    const [room, r] = this.#rooms.entries().next().value ?? [null, null];
    this.#urlRoom = room;
    if (room !== null) {
      for (const [k, v] of Object.entries(this.#catchup(r))) query.set(k, String(v));
    }
    const search = query.toString();
    const path = room === null ? "" : `/${encodeURIComponent(room)}`;
    return `${this.#opts.url}${path}${search ? `?${search}` : ""}`;
  }

  async #tokenForConnection() {
    const source = this.#token;
    this.#currentToken = typeof source === "function" ? String((await source()) ?? "") : source;
    return this.#currentToken;
  }

  async #open() {
    clearTimeout(this.#retryTimer);
    const gen = ++this.#gen;
    this.#dispatch("connecting", { attempt: this.#attempt });
    let token;
    try {
      token = await this.#tokenForConnection();
    } catch (err) {
      if (gen !== this.#gen) return;
      this.#dispatch("error", { code: "token_source_failed", message: String(err) });
      this.#scheduleReconnect(1006, "the token source failed");
      return;
    }
    if (gen !== this.#gen) return; // disconnected (or reconnected) meanwhile
    const url = this.#socketUrl(token);
    const ws = new this.#WebSocket(url);
    this.#ws = ws;
    this.#welcomed = false;
    ws.addEventListener("message", (event) => {
      if (this.#ws === ws) this.#onRaw(event.data);
    });
    ws.addEventListener("close", (event) => {
      if (this.#ws === ws) this.#lost(event.code, event.reason, url);
    });
  }

  /** Abandon the current socket (its events are ignored from now on). */
  #drop(reason) {
    this.#gen++;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#watchTimer);
    clearTimeout(this.#refreshTimer);
    const ws = this.#ws;
    this.#ws = null;
    this.#welcomed = false;
    if (ws !== null) {
      try {
        ws.close(1000, reason);
      } catch {
        // already closed
      }
      this.#afterLoss();
    }
  }

  /** What a lost connection means for what was in flight on it. */
  #afterLoss() {
    for (const r of this.#rooms.values()) r.joined = false;
    for (const [ref, entry] of this.#pending) {
      if (entry.sent && entry.room === null) {
        // Messages to everyone are not stored and ignore keys: a resend could
        // deliver one twice, so it is not sent again.
        this.#pending.delete(ref);
        entry.reject(new ChatError("connection_lost", "the connection dropped before the ack"));
      } else {
        entry.sent = false;
      }
    }
    const error = new ChatError("connection_lost", "the connection dropped before the answer");
    for (const request of this.#requests.values()) request.reject(error);
    this.#requests.clear();
  }

  #lost(code, reason, url) {
    const welcomed = this.#welcomed;
    this.#drop(reason);
    if (isFinalClose(code)) {
      this.#refuse({ code, reason });
    } else if (!welcomed && code === 1006 && this.#fetch) {
      this.#probe(url);
    } else {
      this.#scheduleReconnect(code, reason);
    }
  }

  /** A browser cannot see why an upgrade failed. Ask the same URL over plain
   * HTTP: a 401 or 403 means the server refused us, so retrying is pointless. */
  async #probe(url) {
    const gen = this.#gen;
    let status = 0;
    let body = "";
    try {
      const response = await this.#fetch(url.replace(/^ws/, "http"), { cache: "no-store" });
      status = response.status;
      body = (await response.text()).trim().slice(0, 200);
    } catch {
      // unreachable: a restart, or the network is down
    }
    if (gen !== this.#gen || this.#ended) return; // the caller moved on meanwhile
    if (status === 401 || status === 403) this.#refuse({ code: 1006, reason: body, status });
    else this.#scheduleReconnect(1006, status ? `HTTP ${status}` : "unreachable");
  }

  #refuse(detail) {
    this.#rejectConnect(new ChatError("refused", detail.reason || `refused (${detail.status ?? detail.code})`));
    this.#stop({ status: null, byCaller: false, ...detail });
  }

  #stop(detail) {
    this.#setState("closed");
    this.#dispatch("closed", detail);
  }

  #rejectConnect(error) {
    const waiters = this.#connectWaiters;
    this.#connectWaiters = [];
    for (const w of waiters) w.reject(error);
  }

  /** The one place that decides when to connect again after a loss. */
  #scheduleReconnect(code, reason) {
    clearTimeout(this.#retryTimer);
    // A busy or full pod (1013) gets a longer first wait than a restart (1001).
    const attempt = code === 1013 ? Math.max(this.#attempt, 3) : this.#attempt;
    this.#attempt = attempt + 1;
    const delayMs = backoffDelay(attempt, this.#opts.backoffBaseMs, this.#opts.backoffCapMs);
    this.#setState("reconnecting");
    this.#dispatch("reconnecting", { attempt: this.#attempt, delayMs, code, reason });
    this.#retryTimer = setTimeout(() => this.#open(), delayMs);
  }

  /** Ping when the server has been silent; give up when it stays silent. */
  #watch() {
    clearTimeout(this.#watchTimer);
    const { pingIntervalMs, pongTimeoutMs } = this.#opts;
    if (!(pingIntervalMs > 0)) return;
    const wait = this.#pinged ? pongTimeoutMs : pingIntervalMs;
    this.#watchTimer = setTimeout(() => {
      if (!this.#live()) return;
      const silent = Date.now() - this.#lastFrameAt;
      if (this.#pinged && silent >= pingIntervalMs + pongTimeoutMs) {
        this.#lost(1006, "no answer to ping", "");
        return;
      }
      if (!this.#pinged && silent >= pingIntervalMs) {
        this.#pinged = true;
        this.#ws.send(JSON.stringify({ type: "ping", ref: "keepalive" }));
      }
      this.#watch();
    }, wait);
  }

  #transmit(entry) {
    if (entry.sent) return;
    this.#ws.send(entry.text); // the same key every time: a resend is stored once
    if (entry.resent) this.#stats.resent++;
    entry.sent = true;
    entry.resent = true;
  }

  #request(frame, kind, room, extra = {}) {
    const ref = `${kind}-${this.#nextRef++}`;
    return new Promise((resolve, reject) => {
      this.#requests.set(ref, { kind, room, resolve, reject, ...extra });
      this.#ws.send(JSON.stringify({ ...frame, ref }));
    });
  }

  #sendJoin(room, r) {
    this.#request({ type: "join", room, ...this.#catchup(r) }, "join", room).catch((error) => {
      if (error.code === "connection_lost") return; // joined again on the next connection
      if (this.#rooms.get(room) !== r) return;
      const asked = r.waiters.length > 0; // a join() waits: it hears of it
      this.#forget(room, error);
      if (!asked) this.#dispatch("left", { room, reason: error.code, ref: null });
    });
  }

  /** Drop a room: its waiting joins and unacknowledged messages fail. */
  #forget(room, error) {
    const r = this.#rooms.get(room);
    if (r === undefined) return;
    this.#rooms.delete(room);
    this.#settleJoin(r, error);
    for (const [ref, entry] of this.#pending) {
      if (entry.room === room) {
        this.#pending.delete(ref);
        entry.reject(error);
      }
    }
  }

  #settleJoin(r, error) {
    const waiters = r.waiters;
    r.waiters = [];
    for (const w of waiters) (error ? w.reject(error) : w.resolve());
  }

  #joined(room) {
    const r = this.#rooms.get(room);
    if (r === undefined) return;
    r.joined = true;
    r.resumable = true;
    this.#settleJoin(r, null);
  }

  // -- frames from the server ---------------------------------------------------------

  #onRaw(raw) {
    this.#lastFrameAt = Date.now();
    this.#pinged = false;
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return; // not a frame this client understands
    }
    if (!frame || typeof frame !== "object") return;
    this.#dispatch("frame", frame);
    switch (frame.type) {
      case "welcome":
        this.#onWelcome(frame);
        break;
      case "message":
        this.#onMessage(frame);
        break;
      case "sync":
        this.#onSync(frame);
        break;
      case "ack":
        this.#onAck(frame);
        break;
      case "joined":
        this.#answer(frame, frame);
        this.#joined(frame.room);
        break;
      case "left":
        this.#onLeft(frame);
        break;
      case "presence":
        if (!this.#answer(frame, frame.members)) this.#dispatch("presence", frame);
        break;
      case "refreshed":
        this.#onRefreshed(frame);
        break;
      case "error":
        this.#onError(frame);
        break;
      case "member_joined":
      case "member_left":
        this.#dispatch(frame.type, frame);
        break;
      default:
        break; // pong, and frame types added later
    }
  }

  /** Settle the request `frame.ref` answers; false if it answers none. */
  #answer(frame, value) {
    const request = frame.ref == null ? undefined : this.#requests.get(frame.ref);
    if (request === undefined) return false;
    this.#requests.delete(frame.ref);
    request.resolve(value);
    return true;
  }

  #onWelcome(frame) {
    this.#welcomed = true;
    this.#welcome = frame;
    this.#attempt = 0;
    this.#setState("live");
    this.#expiresAt =
      frame.expires_at !== undefined ? frame.expires_at : tokenExpiry(this.#currentToken || "");
    // The URL's room is joined; the others are joined (resuming) now.
    const first = this.#urlRoom;
    if (first !== null) this.#joined(first);
    for (const [room, r] of this.#rooms) {
      if (room !== first) this.#sendJoin(room, r);
    }
    // Everything unacknowledged, in the order it was sent, with its key.
    for (const entry of this.#pending.values()) this.#transmit(entry);
    this.#scheduleRefresh();
    this.#watch();
    const again = !this.#fresh;
    this.#fresh = false;
    if (again) this.#stats.reconnects++;
    this.#dispatch(again ? "reconnected" : "connected", frame);
    const waiters = this.#connectWaiters;
    this.#connectWaiters = [];
    for (const w of waiters) w.resolve(frame);
  }

  #onMessage(frame) {
    const room = frame.room;
    if (typeof room !== "string") {
      this.#dispatch("message", frame); // to everyone, or to this user: best effort
      return;
    }
    const r = this.#rooms.get(room);
    if (r === undefined) return; // a room left meanwhile
    if (typeof frame.offset !== "number" || typeof frame.epoch !== "string") {
      // Not stored (the pod could not reach Redis): it reached this pod's
      // members only. If its stored copy comes later it is not shown twice.
      if (typeof frame.id === "string") {
        this.#unstamped.add(frame.id);
        if (this.#unstamped.size > MAX_UNSTAMPED_IDS) {
          this.#unstamped.delete(this.#unstamped.values().next().value);
        }
      }
      this.#dispatch("message", frame);
      return;
    }
    if (r.epoch === frame.epoch && frame.offset <= r.offset) {
      this.#stats.duplicates++;
      return; // seen already: a replay overlapping live delivery, a resend's echo
    }
    if (r.known && r.epoch !== null && r.epoch !== frame.epoch) {
      this.#dispatch("unrecoverable", { room, reason: "epoch_changed", lost: null, catchup: "live" });
    } else if (r.known && r.epoch === frame.epoch && frame.offset > r.offset + 1) {
      const lost = frame.offset - r.offset - 1;
      this.#dispatch("unrecoverable", { room, reason: "gap", lost, catchup: "live" });
    }
    r.epoch = frame.epoch;
    r.offset = frame.offset;
    r.known = true;
    if (typeof frame.id === "string" && this.#unstamped.delete(frame.id)) {
      this.#dispatch("stored", frame); // delivered before without an offset
      return;
    }
    this.#dispatch("message", frame);
  }

  #onSync(frame) {
    const r = this.#rooms.get(frame.room);
    if (r === undefined) return;
    const catchup = r.catchup ?? "live";
    r.catchup = "live";
    const epoch = typeof frame.epoch === "string" ? frame.epoch : null;
    const replayed = typeof frame.replayed === "number" ? frame.replayed : 0;
    // The server says where delivery continues: the replayed messages start
    // at `first`, live ones after `offset`.
    r.epoch = epoch;
    if (replayed > 0 && typeof frame.first === "number") r.offset = frame.first - 1;
    else if (typeof frame.offset === "number") r.offset = frame.offset;
    r.known = true;
    this.#dispatch("sync", { ...frame, catchup });
    if (frame.complete === false) {
      this.#dispatch("unrecoverable", {
        room: frame.room,
        reason: String(frame.reason ?? "unknown"),
        lost: typeof frame.lost === "number" ? frame.lost : null,
        catchup,
      });
    }
  }

  #onAck(frame) {
    const entry = this.#pending.get(frame.ref);
    if (entry === undefined) return;
    this.#pending.delete(frame.ref);
    const ack = { ...frame, key: entry.key };
    this.#dispatch("ack", ack);
    entry.resolve(ack);
  }

  #onLeft(frame) {
    if (this.#answer(frame, frame)) return;
    // Unasked: the server took the room away (a refreshed token that no
    // longer allows it, ...).
    if (!this.#rooms.has(frame.room)) return;
    const reason = String(frame.reason ?? "left");
    this.#forget(frame.room, new ChatError(reason, `removed from room ${frame.room}`, { server: true, frame }));
    this.#dispatch("left", { room: frame.room, reason, ref: null });
  }

  #onError(frame) {
    const error = new ChatError(String(frame.code), String(frame.message ?? frame.code), {
      server: true,
      frame,
    });
    const entry = frame.ref == null ? undefined : this.#pending.get(frame.ref);
    if (entry !== undefined) {
      this.#pending.delete(frame.ref);
      entry.reject(error);
      return;
    }
    const request = frame.ref == null ? undefined : this.#requests.get(frame.ref);
    if (request !== undefined) {
      this.#requests.delete(frame.ref);
      request.reject(error);
      return;
    }
    this.#dispatch("error", { code: error.code, message: error.message, frame });
  }

  // -- token refresh -------------------------------------------------------------------

  #scheduleRefresh() {
    clearTimeout(this.#refreshTimer);
    if (typeof this.#token !== "function" || typeof this.#expiresAt !== "number") return;
    const left = this.#expiresAt * 1000 - Date.now();
    const margin = Math.min(this.#opts.refreshMarginMs, left / 2);
    this.#refreshTimer = setTimeout(() => this.#refresh(), Math.max(0, left - margin));
  }

  async #refresh() {
    const gen = this.#gen;
    let token;
    try {
      token = String((await this.#token()) ?? "");
    } catch (err) {
      if (gen !== this.#gen) return;
      this.#dispatch("error", { code: "token_source_failed", message: String(err) });
      this.#retryRefresh();
      return;
    }
    if (gen !== this.#gen || !this.#live()) return;
    try {
      await this.#request({ type: "refresh", token }, "refresh", null, { token });
    } catch (error) {
      if (gen !== this.#gen || error.code === "connection_lost") return;
      if (error.code === "unknown_type") {
        // A server without token refresh: a new connection with a fresh
        // token, resuming every room, before the old token expires.
        this.#drop("refreshing the token");
        this.#setState("reconnecting");
        this.#dispatch("reconnecting", { attempt: 0, delayMs: 0, code: 1000, reason: "refreshing the token" });
        this.#open();
        return;
      }
      this.#dispatch("error", { code: error.code, message: error.message, frame: error.frame });
      this.#retryRefresh();
    }
  }

  /** After a failed refresh: try again in a while, while the token lasts. */
  #retryRefresh() {
    const left = (this.#expiresAt ?? 0) * 1000 - Date.now();
    if (left > 2000) this.#refreshTimer = setTimeout(() => this.#refresh(), left / 2);
  }

  #onRefreshed(frame) {
    const request = frame.ref == null ? undefined : this.#requests.get(frame.ref);
    if (request === undefined || request.kind !== "refresh") return;
    this.#requests.delete(frame.ref);
    this.#currentToken = request.token;
    this.#expiresAt = frame.expires_at !== undefined ? frame.expires_at : tokenExpiry(request.token);
    request.resolve(frame);
    this.#dispatch("refreshed", { expiresAt: this.#expiresAt });
    this.#scheduleRefresh();
  }
}
