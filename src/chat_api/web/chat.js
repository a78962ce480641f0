// The chat page of chat-api: plain JavaScript, no build step, no dependencies.
//
// Safety rule for this file: every string that came from a user or from the
// server goes into the page with textContent (never innerHTML), so nothing a
// user types -- a message, a name, a room -- can run as code.
//
// The connection -- reconnecting with backoff, resuming the room where it
// left off, sending unacknowledged messages again with their keys -- is
// chat-client.js (docs/client-js.md); this file is what the page shows.
// Every message carries a random key, kept for its resends (after a
// reconnect, or "Send again"): the server stores a key's message once.

import { ChatClient, isFinalClose, newKey } from "./chat-client.js";

const ROOM_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$/;
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
  client: null, // the ChatClient of the current room; events of any other one are ignored
  room: "",
  name: "",
  token: "",
  me: null, // {id, name} from the welcome
  waiting: new Set(), // own messages queued or sent, not yet acknowledged
  unstored: new Map(), // id -> own message acknowledged without an offset
  seen: new Map(), // message id -> its element (a message is shown once)
  members: new Map(), // user id -> {id, name}
  presence: "unknown", // unknown | supported | unsupported
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

function newEntry(text) {
  const entry = { key: newKey(), text, room: state.room, status: "" };
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

function waitingText() {
  return state.phase === Phase.REFUSED ? WAIT_REFUSED : WAIT_OFFLINE;
}

/** Hand the message to the client, which keeps it until it is acknowledged
 * (sending it again, with its key, after a reconnect). */
function transmit(entry) {
  const client = state.client;
  if (client === null) return;
  if (client.state === "live") setEntryStatus(entry, "sending", "sending…");
  else setEntryStatus(entry, "queued", waitingText());
  state.waiting.add(entry);
  client.send({ text: entry.text }, { room: entry.room, key: entry.key }).then(
    (ack) => {
      state.waiting.delete(entry);
      if (state.client === client) onAck(entry, ack);
    },
    (error) => {
      state.waiting.delete(entry);
      if (state.client === client) onSendError(entry, error);
    },
  );
}

function resend(entry) {
  entry.room = state.room;
  // Move it to the end of the log: it will be delivered after what came since.
  ui.log.append(entry.el);
  transmit(entry);
}

/** What the page says of messages still waiting for their ack. */
function markWaiting(status, text) {
  for (const entry of state.waiting) setEntryStatus(entry, status, text);
}

function onSendError(entry, error) {
  if (error.code === "queue_full") {
    setEntryStatus(entry, "failed", `Not sent: ${MAX_QUEUED} messages are already waiting.`, true);
  } else if (error.code === "connection_lost" || error.code === "closed") {
    setEntryStatus(entry, "unconfirmed", "Not confirmed: the connection dropped.", true);
  } else {
    const words = ERROR_TEXT[error.code] || error.message || "The server reported an error.";
    setEntryStatus(entry, "failed", `Not sent: ${words}`, true);
  }
}

function onAck(entry, ack) {
  const shown = state.seen.get(ack.id);
  if (ack.room !== null && ack.offset === null) {
    // A room message the server could not store (Redis unreachable, or its
    // answer lost): it may not reach everyone. Keep our copy, say so, and
    // confirm it if the room's copy arrives after all (the `stored` event).
    if (shown !== undefined && shown !== entry.el) shown.remove();
    entry.el.dataset.id = ack.id;
    state.seen.set(ack.id, entry.el);
    state.unstored.set(ack.id, entry);
    setEntryStatus(entry, "unconfirmed", NOT_STORED, true);
    return;
  }
  if (shown !== undefined && shown !== entry.el) {
    entry.el.remove(); // the room's copy of the message is already on the page
    return;
  }
  confirmEntry(entry, ack.id);
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
  if (!text.trim() || state.client === null) return;
  const frame = JSON.stringify({ type: "message", data: { text }, ref: 1, key: newKey() });
  const size = new TextEncoder().encode(frame).length;
  const limit = state.client.limits.max_message_bytes;
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
  const client = state.client;
  if (state.presence === "unsupported" || client === null) return;
  client.presence(state.room).then(
    (members) => {
      if (state.client === client) showPresence(members);
    },
    (error) => {
      if (state.client !== client || !error.server) return; // the connection dropped: asked again
      // An older server: no member list, and that is fine.
      state.presence = "unsupported";
      ui.members.hidden = true;
    },
  );
}

function showPresence(members) {
  if (!Array.isArray(members)) return;
  state.presence = "supported";
  state.members.clear();
  for (const m of members) {
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

// -- what the client tells the page ----------------------------------------------------

function onWelcome(frame, again) {
  state.me = frame.user;
  const pod = String(frame.pod ?? "");
  ui.status.title = pod ? `connected to pod ${pod}` : "";
  ui.roomTitle.textContent = `#${state.room} · you are ${state.me.name}`;
  setPhase(Phase.LIVE);
  showNotice("");
  document.body.classList.add("joined");
  showJoinForm(false);
  systemLine(again ? `Reconnected to #${state.room}.` : `You joined #${state.room} as ${state.me.name}.`);
  state.members.clear();
  requestPresence();
  markWaiting("sending", "sending…"); // the client sent them again, with their keys
}

const SYNC_REASON = {
  window_exceeded: "they are older than what the server keeps",
  epoch_changed: "the room's history was reset",
  unavailable: "the server could not reach its store",
};

/** The start of a catch-up: say what the messages that follow are. */
function onSync(frame) {
  if (frame.room !== state.room || frame.complete === false) return; // see onUnrecoverable
  const n = typeof frame.replayed === "number" ? frame.replayed : 0;
  if (n > 0 && frame.catchup === "history") {
    systemLine(n === 1 ? "The last message before you came:" : `The last ${n} messages before you came:`);
  } else if (n > 0 && frame.catchup === "resume") {
    systemLine(n === 1 ? "1 message sent while you were away:" : `${n} messages sent while you were away:`);
  }
}

function onUnrecoverable(detail) {
  if (detail.room !== state.room) return;
  const why = SYNC_REASON[detail.reason] || String(detail.reason ?? "unknown reason");
  const what =
    detail.catchup === "history"
      ? "Earlier messages could not be loaded"
      : "Some messages sent while you were away could not be recovered";
  systemLine(`${what}: ${why}.`, "error");
}

function onServerError(detail) {
  const words = ERROR_TEXT[detail.code] || "The server reported an error.";
  const extra = typeof detail.message === "string" && detail.message ? ` (${detail.message})` : "";
  systemLine(`${words}${extra}`, "error");
}

function refuse(text) {
  setPhase(Phase.REFUSED);
  showNotice(text);
  showJoinForm(true);
  ui.auth.open = true;
  markWaiting("queued", WAIT_REFUSED);
}

/** The client will not reconnect by itself: say why, and what to do. */
function onClosed(detail) {
  if (detail.byCaller) return;
  const reason = detail.reason || "not allowed";
  if (detail.status === 401 || detail.status === 403) {
    const why = detail.reason ? `: ${detail.reason}` : "";
    let hint = "Paste an access token and press Join.";
    if (detail.status === 403) hint = "Try another room, or a token that allows this one.";
    else if (state.token) hint = "Check the access token (it may have expired) and press Join.";
    refuse(`The server refused the connection (HTTP ${detail.status}${why}). ${hint}`);
  } else if (detail.code === 1008 && /expired/i.test(reason)) {
    refuse("Your access token expired, so the server closed the connection. Paste a new one and press Join.");
  } else if (detail.code === 1008) {
    refuse(`The server closed the connection: ${reason}. Check the access token and press Join.`);
  } else if (isFinalClose(detail.code)) {
    refuse(`The server closed the connection: ${reason}. Press Join to connect again.`);
  }
}

function onReconnecting(detail) {
  markWaiting("queued", WAIT_OFFLINE);
  setPhase(Phase.RECONNECTING, `attempt ${detail.attempt} in ${(detail.delayMs / 1000).toFixed(1)} s`);
  const words = CLOSE_TEXT[detail.code];
  if (words) showNotice(`${words} ${detail.reason ? `(${detail.reason}) ` : ""}Reconnecting…`);
}

function onConnecting(detail) {
  if (detail.attempt > 0) setPhase(Phase.RECONNECTING, `attempt ${detail.attempt}`);
}

/** A client for `room`, its events wired to the page (those of a client
 * that is no longer the page's are ignored). */
function newClient(room) {
  const client = new ChatClient({
    room,
    name: state.name,
    token: state.token,
    history: HISTORY_ON_JOIN,
    maxPending: MAX_QUEUED,
  });
  const on = (type, handler) =>
    client.addEventListener(type, (event) => {
      if (state.client === client) handler(event.detail);
    });
  on("connecting", onConnecting);
  on("connected", (frame) => onWelcome(frame, false));
  on("reconnected", (frame) => onWelcome(frame, true));
  on("reconnecting", onReconnecting);
  on("closed", onClosed);
  on("message", renderMessage);
  on("stored", (frame) => {
    const entry = state.unstored.get(frame.id);
    if (entry !== undefined) confirmEntry(entry, frame.id); // stored after all: everyone has it
  });
  on("sync", onSync);
  on("unrecoverable", onUnrecoverable);
  on("presence", (frame) => {
    if (frame.room === state.room) showPresence(frame.members);
  });
  on("member_joined", onMemberEvent);
  on("member_left", onMemberEvent);
  on("error", onServerError);
  return client;
}

function reconnectNow() {
  if (state.client !== null) state.client.reconnectNow();
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
  state.name = name;
  state.token = token;
  if (room !== state.room || state.client === null) {
    const old = state.room;
    const unsent = [...state.waiting].filter((e) => e.status === "queued").length;
    const unconfirmed = state.waiting.size - unsent;
    if (state.client !== null) {
      const previous = state.client;
      state.client = null; // its events (and the rejections of close) are ignored
      previous.close();
    }
    state.waiting.clear();
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
    state.room = room;
    state.client = newClient(room);
  } else {
    // The same room again (another name or token): a new connection that
    // resumes where the last one left off, with what is still waiting.
    state.client.name = name;
    state.client.token = token;
  }
  state.presence = state.presence === "unsupported" ? "unsupported" : "unknown";
  store("chat-api.name", name);
  writeAddress(room);
  ui.roomTitle.textContent = `#${room}`;
  document.title = `#${room} · chat-api`;
  showNotice("");
  setPhase(Phase.CONNECTING);
  state.client.connect().catch(() => {
    // Refused: the `closed` event has said why.
  });
  return true;
}

/** Leave the room: close the connection, and show the join form again.
 * What is still waiting stays queued for the next Join of this room. */
function leave() {
  const room = state.room;
  if (state.client !== null) state.client.disconnect();
  markWaiting("queued", WAIT_OFFLINE);
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
