// The chat page of chat-api: plain JavaScript, no build step, no dependencies.
//
// Safety rule for this file: every string that came from a user or from the
// server goes into the page with textContent (never innerHTML), so nothing a
// user types -- a message, a name, a room -- can run as code.
//
// The wire protocol is docs/protocol.md. In short: connect to
// /api/chat-api/ws/{room}?name=..[&access_token=..], get a `welcome`, send
// {"type":"message","data":{"text":..},"ref":n,"key":k}, get `message` frames
// (yours too) and an `ack` per ref; `error` frames leave the connection open.
// Every message carries a random key, kept for its resends (after a reconnect,
// or "Send again"): the server stores a key's message once.

const WS_PATH = "/api/chat-api/ws/";
const ROOM_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$/;
// Reconnect delays: attempt n waits a random time between half and all of
// min(CAP, BASE * 2^n) ("equal jitter"), so a pod restart does not bring
// every client back in the same millisecond.
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 15000;
const MAX_QUEUED = 50; // messages kept while not connected; more are refused
const MAX_LOG_ITEMS = 500; // older lines are dropped from the page
const HISTORY_ON_JOIN = 50; // recent messages asked for when entering a room
const NOT_STORED = "Not confirmed: the server could not store it, so it may not reach everyone.";
const WAIT_OFFLINE = "Waiting for the connection; it is sent when the page is back online.";
const WAIT_REFUSED = "Waiting: the server refused the connection; it is sent once you join again.";

const Phase = Object.freeze({
  IDLE: "idle",
  CONNECTING: "connecting",
  LIVE: "live",
  RECONNECTING: "reconnecting",
  REFUSED: "refused",
});

const PHASE_TEXT = {
  idle: "not connected",
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  refused: "refused",
};

const ERROR_TEXT = {
  invalid_json: "The server could not read what this page sent.",
  invalid_frame: "The server rejected a malformed request from this page.",
  unknown_type: "The server does not support that request.",
  missing_data: "The message was empty.",
  invalid_room: "That room name is not allowed: use 1–64 letters, digits, '_', '.' or '-'.",
  not_in_room: "You are not in that room.",
  too_many_rooms: "You are in too many rooms at once.",
  forbidden_room: "You are not allowed in that room.",
  rate_limited: "You are sending messages too fast. Wait a moment, then send again.",
  key_conflict: "The server already has another message under this one's key.",
  unavailable: "The service is briefly unavailable. Try again in a moment.",
};

const CLOSE_TEXT = {
  1001: "The server is restarting or shutting down.",
  1003: "The server refused a binary frame.",
  1007: "The server received text that was not valid UTF-8.",
  1009: "A message was too large for the server.",
  1011: "The server hit an internal error.",
  1013: "The server is busy, or this connection fell behind.",
};

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  roomTitle: $("room-title"),
  join: $("join"),
  name: $("name"),
  room: $("room"),
  auth: $("auth"),
  token: $("token"),
  retry: $("retry-button"),
  edit: $("edit-button"),
  leave: $("leave-button"),
  notice: $("notice"),
  members: $("members"),
  memberCount: $("member-count"),
  memberList: $("member-list"),
  log: $("log"),
  composer: $("composer"),
  message: $("message"),
  send: $("send"),
};

const state = {
  phase: Phase.IDLE,
  ws: null, // the current WebSocket; events of any other one are ignored
  welcomed: false, // did the current socket get its welcome?
  room: "",
  name: "",
  token: "",
  me: null, // {id, name} from the welcome
  pod: "",
  limits: { max_message_bytes: 65536 },
  attempt: 0, // reconnect attempts since the last welcome
  retryTimer: 0,
  nextRef: 1,
  outbox: [], // own messages waiting for a live connection
  inflight: new Map(), // ref -> own message sent but not yet acknowledged
  unstored: new Map(), // id -> own message acknowledged without an offset
  seen: new Map(), // message id -> its element (a message is shown once)
  members: new Map(), // user id -> {id, name}
  presenceRef: null,
  presence: "unknown", // unknown | supported | unsupported
  resume: null, // {room, offset, epoch} of the last room message seen: a reconnect resumes there
  catchup: "", // what the current connection asked for: "resume", "history" or ""
};

// -- small helpers -------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // text, never markup
  return node;
}

const timeFormat = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

function timeElement(ms) {
  const when = new Date(typeof ms === "number" ? ms : Date.now());
  const node = el("time", "ts", timeFormat.format(when));
  node.dateTime = when.toISOString();
  node.title = when.toLocaleString();
  return node;
}

function store(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // Storage may be disabled (private mode); the page works without it.
  }
}

function stored(key) {
  try {
    return localStorage.getItem(key) || "";
  } catch {
    return "";
  }
}

function decode(part) {
  try {
    return decodeURIComponent(part.replace(/\+/g, " "));
  } catch {
    return "";
  }
}

/** Room, name and token from the address: `?room=..&name=..` and the
 * fragment, `#general`, `#room=general&token=..` or `#general&token=..`.
 * A token is only read from the fragment, which browsers never send to
 * servers or put in Referer headers. */
function readAddress() {
  const query = new URLSearchParams(location.search);
  const found = { room: query.get("room") || "", name: query.get("name") || "", token: "" };
  for (const part of location.hash.replace(/^#/, "").split("&")) {
    if (!part) continue;
    const eq = part.indexOf("=");
    if (eq < 0) {
      found.room = decode(part);
      continue;
    }
    const key = part.slice(0, eq);
    const value = decode(part.slice(eq + 1));
    if (key === "room") found.room = value;
    else if (key === "name") found.name = value;
    else if (key === "token" || key === "access_token") found.token = value;
  }
  return found;
}

/** Show the room in the address (`#room`), dropping any token from it. */
function writeAddress(room) {
  const query = new URLSearchParams(location.search);
  query.delete("room");
  const search = query.toString();
  const url = location.pathname + (search ? `?${search}` : "") + `#${encodeURIComponent(room)}`;
  history.replaceState(null, "", url);
}

// -- what the page shows --------------------------------------------------------

function setPhase(phase, detail) {
  state.phase = phase;
  ui.status.dataset.state = phase;
  ui.statusText.textContent = detail ? `${PHASE_TEXT[phase]} — ${detail}` : PHASE_TEXT[phase];
  ui.retry.hidden = phase !== Phase.RECONNECTING;
  const usable = phase !== Phase.IDLE;
  ui.message.disabled = !usable;
  ui.send.disabled = !usable;
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

/** Once in a room the name/room form folds into the bar; "Change" opens it again. */
function showJoinForm(open) {
  document.body.classList.toggle("editing", open);
  ui.edit.setAttribute("aria-expanded", String(open));
}

function nearBottom() {
  const log = ui.log;
  return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
}

function append(item) {
  const follow = nearBottom();
  ui.log.append(item);
  while (ui.log.childElementCount > MAX_LOG_ITEMS) {
    const old = ui.log.firstElementChild;
    if (old.dataset.id) state.seen.delete(old.dataset.id);
    old.remove();
  }
  if (follow) ui.log.scrollTop = ui.log.scrollHeight;
}

function systemLine(text, kind = "info") {
  const item = el("li", `system ${kind}`);
  item.append(el("span", "text", text), timeElement());
  append(item);
}

/** The text of a message's data: its `text` if it has one, else the JSON. */
function messageText(data) {
  if (typeof data === "string") return { text: data, raw: false };
  if (data && typeof data === "object" && typeof data.text === "string") {
    return { text: data.text, raw: false };
  }
  return { text: JSON.stringify(data), raw: true };
}

function messageElement(fromName, ts, data, own) {
  const item = el("li", own ? "msg own" : "msg");
  const head = el("div", "meta");
  head.append(el("span", "from", fromName || "server"));
  if (own) head.append(el("span", "you", "(you)"));
  head.append(timeElement(ts));
  const { text, raw } = messageText(data);
  item.append(head, el("p", raw ? "text raw" : "text", text));
  return item;
}

function renderMessage(frame) {
  if (typeof frame.id === "string" && state.seen.has(frame.id)) {
    const entry = state.unstored.get(frame.id);
    if (entry !== undefined && typeof frame.offset === "number") {
      confirmEntry(entry, frame.id); // stored after all: everyone has it
    }
    return;
  }
  const sender = frame.from && typeof frame.from === "object" ? frame.from : {};
  const own = state.me !== null && sender.id === state.me.id;
  const item = messageElement(String(sender.name ?? ""), frame.ts, frame.data, own);
  if (typeof frame.id === "string") {
    item.dataset.id = frame.id;
    state.seen.set(frame.id, item);
  }
  if (frame.room === null) item.append(el("span", "tag", "to everyone"));
  append(item);
}

// -- own messages: queued, sent, acknowledged or failed ---------------------------

function setEntryStatus(entry, status, text, canRetry = false) {
  entry.status = status;
  entry.el.dataset.status = status;
  entry.note.textContent = text;
  entry.retry.hidden = !canRetry;
}

/** A random message key: a UUID where the page is a secure context, else 128
 * random bits in hex (crypto.getRandomValues works everywhere). */
function newKey() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function newEntry(text) {
  const entry = { ref: state.nextRef++, key: newKey(), text, room: state.room, status: "" };
  entry.el = messageElement(state.me ? state.me.name : state.name, Date.now(), { text }, true);
  entry.el.classList.add("pending");
  entry.note = el("span", "note");
  entry.retry = el("button", "retry", "Send again");
  entry.retry.type = "button";
  entry.retry.addEventListener("click", () => resend(entry));
  entry.el.append(entry.note, entry.retry);
  append(entry.el);
  return entry;
}

function transmit(entry) {
  const ws = state.ws;
  if (state.phase !== Phase.LIVE || ws === null || ws.readyState !== WebSocket.OPEN) {
    queue(entry);
    return;
  }
  // The same key every time this message is sent: a resend is stored once.
  const frame = { type: "message", data: { text: entry.text }, ref: entry.ref, key: entry.key };
  if (entry.room !== state.room) frame.room = entry.room;
  ws.send(JSON.stringify(frame));
  state.inflight.set(entry.ref, entry);
  setEntryStatus(entry, "sending", "sending…");
}

function queue(entry) {
  if (state.outbox.length >= MAX_QUEUED) {
    setEntryStatus(entry, "failed", `Not sent: ${MAX_QUEUED} messages are already waiting.`, true);
    return;
  }
  state.outbox.push(entry);
  setEntryStatus(entry, "queued", state.phase === Phase.REFUSED ? WAIT_REFUSED : WAIT_OFFLINE);
}

function resend(entry) {
  entry.room = state.room;
  // Move it to the end of the log: it will be delivered after what came since.
  ui.log.append(entry.el);
  transmit(entry);
}

function flushOutbox() {
  const waiting = state.outbox;
  state.outbox = [];
  for (const entry of waiting) {
    if (entry.room === state.room) transmit(entry);
    else setEntryStatus(entry, "failed", `Not sent: it was for room #${entry.room}.`, true);
  }
}

/** Messages sent but not acknowledged when a connection ends may or may not
 * have reached the room: they go back to the outbox, ahead of what was
 * written since, and are sent again, with their keys, once the page is back
 * online (a duplicate's ack confirms the stored one). */
function requeueInflight() {
  const unacked = [...state.inflight.values()];
  state.inflight.clear();
  state.outbox = [...unacked, ...state.outbox].slice(0, MAX_QUEUED);
  for (const entry of unacked) setEntryStatus(entry, "queued", WAIT_OFFLINE);
}

function onAck(frame) {
  const entry = state.inflight.get(frame.ref);
  if (entry === undefined) return;
  state.inflight.delete(frame.ref);
  const shown = state.seen.get(frame.id);
  if (frame.room !== null && frame.offset === null) {
    // A room message the server could not store (Redis unreachable, or its
    // answer lost): it may not reach everyone. Keep our copy, say so, and
    // confirm it if the room's copy arrives after all (renderMessage).
    if (shown !== undefined && shown !== entry.el) shown.remove();
    entry.el.dataset.id = frame.id;
    state.seen.set(frame.id, entry.el);
    state.unstored.set(frame.id, entry);
    setEntryStatus(entry, "unconfirmed", NOT_STORED, true);
    return;
  }
  if (shown !== undefined && shown !== entry.el) {
    entry.el.remove(); // the room's copy of the message is already on the page
    return;
  }
  confirmEntry(entry, frame.id);
}

function confirmEntry(entry, id) {
  for (const [key, value] of state.unstored) {
    if (value === entry) state.unstored.delete(key);
  }
  entry.el.classList.remove("pending");
  entry.el.dataset.id = id;
  delete entry.el.dataset.status;
  entry.note.remove();
  entry.retry.remove();
  state.seen.set(id, entry.el);
}

function submitMessage() {
  const text = ui.message.value;
  if (!text.trim()) return;
  const frame = JSON.stringify({ type: "message", data: { text }, ref: state.nextRef });
  const size = new TextEncoder().encode(frame).length;
  const limit = state.limits.max_message_bytes;
  if (size > limit) {
    showNotice(`That message is too long (${size} bytes; the server takes up to ${limit}).`);
    return;
  }
  showNotice("");
  ui.message.value = "";
  fitComposer();
  transmit(newEntry(text));
}

// -- who is here -----------------------------------------------------------------

function renderMembers() {
  ui.memberList.replaceChildren();
  const sorted = [...state.members.values()].sort((a, b) => a.name.localeCompare(b.name));
  for (const member of sorted) {
    const item = el("li", "member", member.name);
    if (state.me && member.id === state.me.id) item.append(el("span", "you", " (you)"));
    ui.memberList.append(item);
  }
  ui.memberCount.textContent = `(${state.members.size})`;
  ui.members.hidden = false;
}

function requestPresence() {
  if (state.presence === "unsupported" || state.ws === null) return;
  state.presenceRef = `presence-${state.nextRef++}`;
  state.ws.send(JSON.stringify({ type: "presence", room: state.room, ref: state.presenceRef }));
}

function onPresence(frame) {
  if (frame.room !== state.room || !Array.isArray(frame.members)) return;
  state.presence = "supported";
  state.members.clear();
  for (const m of frame.members) {
    if (m && typeof m === "object") state.members.set(String(m.id), { id: String(m.id), name: String(m.name ?? "") });
  }
  renderMembers();
}

function onMemberEvent(frame) {
  if (frame.room !== state.room || !frame.user || typeof frame.user !== "object") return;
  const user = { id: String(frame.user.id), name: String(frame.user.name ?? "") };
  const isMe = state.me !== null && user.id === state.me.id;
  if (frame.type === "member_joined") {
    state.members.set(user.id, user);
    if (!isMe) systemLine(`${user.name} joined`, "member-in");
  } else {
    state.members.delete(user.id);
    if (!isMe) systemLine(`${user.name} left`, "member-out");
  }
  if (state.presence === "supported") renderMembers();
}

// -- frames from the server ---------------------------------------------------------

function onWelcome(frame) {
  const again = state.me !== null && state.attempt > 0;
  state.welcomed = true;
  state.attempt = 0;
  state.me = frame.user;
  state.pod = String(frame.pod ?? "");
  if (frame.limits && typeof frame.limits.max_message_bytes === "number") {
    state.limits = frame.limits;
  }
  ui.status.title = state.pod ? `connected to pod ${state.pod}` : "";
  ui.roomTitle.textContent = `#${state.room} · you are ${state.me.name}`;
  setPhase(Phase.LIVE);
  showNotice("");
  document.body.classList.add("joined");
  showJoinForm(false);
  systemLine(again ? `Reconnected to #${state.room}.` : `You joined #${state.room} as ${state.me.name}.`);
  state.members.clear();
  requestPresence();
  flushOutbox();
}

function onError(frame) {
  const words = ERROR_TEXT[frame.code] || "The server reported an error.";
  if (frame.ref !== undefined && frame.ref === state.presenceRef) {
    // An older server: no member list, and that is fine.
    state.presence = "unsupported";
    ui.members.hidden = true;
    return;
  }
  const entry = frame.ref === undefined ? undefined : state.inflight.get(frame.ref);
  if (entry !== undefined) {
    state.inflight.delete(frame.ref);
    setEntryStatus(entry, "failed", `Not sent: ${words}`, true);
    return;
  }
  const detail = typeof frame.message === "string" && frame.message ? ` (${frame.message})` : "";
  systemLine(`${words}${detail}`, "error");
}

const SYNC_REASON = {
  window_exceeded: "they are older than what the server keeps",
  epoch_changed: "the room's history was reset",
  unavailable: "the server could not reach its store",
};

/** The start of a catch-up: say what the messages that follow are. */
function onSync(frame) {
  if (frame.room !== state.room) return;
  if (frame.complete === false) {
    const why = SYNC_REASON[frame.reason] || String(frame.reason ?? "unknown reason");
    const what =
      state.catchup === "history"
        ? "Earlier messages could not be loaded"
        : "Some messages sent while you were away could not be recovered";
    systemLine(`${what}: ${why}.`, "error");
    return;
  }
  const n = typeof frame.replayed === "number" ? frame.replayed : 0;
  if (n > 0 && state.catchup === "history") {
    systemLine(n === 1 ? "The last message before you came:" : `The last ${n} messages before you came:`);
  } else if (n > 0 && state.catchup === "resume") {
    systemLine(n === 1 ? "1 message sent while you were away:" : `${n} messages sent while you were away:`);
  }
}

function onFrame(raw) {
  let frame;
  try {
    frame = JSON.parse(raw);
  } catch {
    return; // not a frame this page understands
  }
  if (!frame || typeof frame !== "object") return;
  switch (frame.type) {
    case "welcome":
      onWelcome(frame);
      break;
    case "message":
      if (typeof frame.offset === "number" && typeof frame.epoch === "string") {
        state.resume = { room: frame.room, offset: frame.offset, epoch: frame.epoch };
      }
      renderMessage(frame);
      break;
    case "sync":
      onSync(frame);
      break;
    case "ack":
      onAck(frame);
      break;
    case "error":
      onError(frame);
      break;
    case "presence":
      onPresence(frame);
      break;
    case "member_joined":
    case "member_left":
      onMemberEvent(frame);
      break;
    default:
      break; // joined, left, pong, and frame types added later
  }
}

// -- the connection ----------------------------------------------------------------

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = new URLSearchParams();
  if (state.name) query.set("name", state.name);
  if (state.token) query.set("access_token", state.token);
  const resume = state.resume;
  if (resume !== null && resume.room === state.room) {
    // Resume where this page left off: the server sends exactly what it missed.
    query.set("since", String(resume.offset));
    query.set("epoch", resume.epoch);
    state.catchup = "resume";
  } else {
    // Nothing seen in this room yet: ask for its recent messages (the server
    // caps the number; one without history ignores the parameter).
    query.set("history", String(HISTORY_ON_JOIN));
    state.catchup = "history";
  }
  const search = query.toString();
  return `${scheme}//${location.host}${WS_PATH}${encodeURIComponent(state.room)}${search ? `?${search}` : ""}`;
}

function openSocket() {
  clearTimeout(state.retryTimer);
  const ws = new WebSocket(socketUrl());
  state.ws = ws;
  state.welcomed = false;
  if (state.phase === Phase.RECONNECTING) setPhase(Phase.RECONNECTING, `attempt ${state.attempt}`);
  else setPhase(Phase.CONNECTING);
  ws.addEventListener("message", (event) => {
    if (state.ws === ws) onFrame(event.data);
  });
  ws.addEventListener("close", (event) => {
    if (state.ws === ws) onClose(event);
  });
}

function closeSocket(reason) {
  clearTimeout(state.retryTimer);
  const ws = state.ws;
  state.ws = null; // its close event is ignored from now on
  if (ws !== null && ws.readyState <= WebSocket.OPEN) ws.close(1000, reason);
}

function refuse(text) {
  setPhase(Phase.REFUSED);
  showNotice(text);
  showJoinForm(true);
  ui.auth.open = true;
  for (const entry of state.outbox) setEntryStatus(entry, "queued", WAIT_REFUSED);
}

function onClose(event) {
  const welcomed = state.welcomed;
  state.ws = null;
  requeueInflight();
  if (event.code === 1008) {
    // Policy: an expired token, a flood of frames, or another refusal.
    const reason = event.reason || "not allowed";
    if (/expired/i.test(reason)) {
      refuse("Your access token expired, so the server closed the connection. Paste a new one and press Join.");
    } else if (/rate/i.test(reason)) {
      showNotice(`The server closed the connection: ${reason}. Reconnecting shortly…`);
      scheduleReconnect(1013);
    } else {
      refuse(`The server closed the connection: ${reason}. Check the access token and press Join.`);
    }
    return;
  }
  if (!welcomed && event.code === 1006) {
    // A browser cannot see why an upgrade failed. Ask the same URL over plain
    // HTTP: a 401 or 403 means the server refused us, so retrying is pointless.
    probe();
    return;
  }
  const words = CLOSE_TEXT[event.code];
  if (words) showNotice(`${words} ${event.reason ? `(${event.reason}) ` : ""}Reconnecting…`);
  scheduleReconnect(event.code);
}

async function probe() {
  const url = socketUrl().replace(/^ws/, "http");
  const ws = state.ws;
  let status = 0;
  let body = "";
  try {
    const response = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    status = response.status;
    body = (await response.text()).trim().slice(0, 200);
  } catch {
    // The server is unreachable: a restart, or the network is down.
  }
  if (state.ws !== ws || state.phase === Phase.IDLE) return; // the user moved on meanwhile
  if (status === 401 || status === 403) {
    const why = body ? `: ${body}` : "";
    let hint = "Paste an access token and press Join.";
    if (status === 403) hint = "Try another room, or a token that allows this one.";
    else if (state.token) hint = "Check the access token (it may have expired) and press Join.";
    refuse(`The server refused the connection (HTTP ${status}${why}). ${hint}`);
    return;
  }
  scheduleReconnect(1006);
}

/** The one place that decides when to connect again after a connection was
 * lost: capped exponential backoff with jitter. socketUrl() adds since/epoch,
 * so the server replays exactly what was missed meanwhile. */
function scheduleReconnect(closeCode) {
  clearTimeout(state.retryTimer);
  // A busy or full pod (1013) gets a longer first wait than a restart (1001).
  const attempt = closeCode === 1013 ? Math.max(state.attempt, 3) : state.attempt;
  state.attempt = attempt + 1;
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
  const delay = ceiling / 2 + Math.random() * (ceiling / 2);
  setPhase(Phase.RECONNECTING, `attempt ${state.attempt} in ${(delay / 1000).toFixed(1)} s`);
  state.retryTimer = setTimeout(openSocket, delay);
}

function reconnectNow() {
  if (state.phase !== Phase.RECONNECTING) return;
  clearTimeout(state.retryTimer);
  openSocket();
}

// -- joining ------------------------------------------------------------------------

/** Connect as `name` to `room` (a new room starts a new conversation).
 * Returns false if the room name is not valid. */
function join(room, name, token) {
  if (room === "stats") {
    // /api/chat-api/ws/stats is the statistics endpoint, not a room.
    showNotice("'stats' is reserved; pick another room name.");
    showJoinForm(true);
    ui.room.focus();
    return false;
  }
  if (!ROOM_PATTERN.test(room)) {
    showNotice("Room names are 1–64 letters, digits, '_', '.' or '-', starting with a letter or digit.");
    showJoinForm(true);
    ui.room.focus();
    return false;
  }
  closeSocket("joining again");
  if (room !== state.room) {
    const old = state.room;
    const unsent = state.outbox.length;
    const unconfirmed = state.inflight.size;
    state.outbox = [];
    state.inflight.clear();
    ui.log.replaceChildren();
    state.seen.clear();
    state.unstored.clear();
    state.members.clear();
    ui.members.hidden = true;
    state.me = null;
    // Say what happened to messages meant for the room just left.
    if (unsent) systemLine(`${unsent} message(s) you wrote in #${old} were not sent.`, "error");
    if (unconfirmed) {
      systemLine(`${unconfirmed} message(s) in #${old} were not confirmed by the server.`, "error");
    }
  }
  state.room = room;
  state.name = name;
  state.token = token;
  state.attempt = 0;
  state.presence = state.presence === "unsupported" ? "unsupported" : "unknown";
  store("chat-api.name", name);
  writeAddress(room);
  ui.roomTitle.textContent = `#${room}`;
  document.title = `#${room} · chat-api`;
  showNotice("");
  setPhase(Phase.CONNECTING);
  openSocket();
  return true;
}

/** Leave the room: close the connection, and show the join form again. */
function leave() {
  const room = state.room;
  closeSocket("left");
  requeueInflight();
  state.welcomed = false;
  state.members.clear();
  ui.members.hidden = true;
  document.body.classList.remove("joined");
  showJoinForm(false);
  ui.roomTitle.textContent = "";
  document.title = "chat-api";
  setPhase(Phase.IDLE);
  showNotice("");
  if (room) systemLine(`You left #${room}.`);
  ui.room.focus();
}

function joinFromForm() {
  if (join(ui.room.value.trim(), ui.name.value.trim(), ui.token.value.trim())) {
    ui.message.focus();
  }
}

function fitComposer() {
  ui.message.style.height = "auto";
  ui.message.style.height = `${Math.min(ui.message.scrollHeight, 160)}px`;
}

function start() {
  const found = readAddress();
  const name = found.name || stored("chat-api.name");
  ui.name.value = name;
  ui.room.value = found.room || "general";
  if (found.token) {
    ui.token.value = found.token;
    ui.auth.open = true;
  }
  ui.members.hidden = true;

  ui.join.addEventListener("submit", (event) => {
    event.preventDefault();
    joinFromForm();
  });
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitMessage();
  });
  ui.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitMessage();
    }
  });
  ui.message.addEventListener("input", fitComposer);
  ui.retry.addEventListener("click", reconnectNow);
  ui.edit.addEventListener("click", () => {
    const open = !document.body.classList.contains("editing");
    showJoinForm(open);
    if (open) ui.name.focus();
  });
  ui.leave.addEventListener("click", leave);
  window.addEventListener("online", reconnectNow);
  window.addEventListener("hashchange", () => {
    const next = readAddress();
    if (next.token) ui.token.value = next.token;
    if (next.room && (next.room !== state.room || next.token)) {
      ui.room.value = next.room;
      joinFromForm();
    }
  });

  if (name || found.token) {
    // A returning visitor (or a link with a token) goes straight in.
    joinFromForm();
  } else {
    writeAddress(ui.room.value);
    ui.name.focus();
  }
}

start();
