// The chat page: protocol v1 (docs/protocol.md) over the node's /ws. Log in (a guest, or a
// user with a password), list and create rooms, join, chat with history, and resume by itself
// when the connection is lost, on the node or its peer (docs/protocol.md, "Resuming after a
// lost connection"): log in again with the session token, re-join each room with `since` =
// the last seq seen, resend every send not acknowledged yet with its original `cid`.
import { el, fill, clock } from './common.js';

const $ = (id) => document.getElementById(id);
const HERE = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
// How long a connection attempt may take before the next address is tried.
const CONNECT_TIMEOUT_MS = 3000;
// Pauses between rounds of resume attempts, and between re-joins of a room still moving.
const BACKOFF_MS = [100, 250, 500, 1000, 2000];
const REJOIN_PAUSE_MS = 300;

let ws = null;
let url = HERE;
let me = null; // welcome: {user, session, node, service, peers}
let asked = ''; // the user name typed (a guest's nick)
let nextId = 1;
const waiting = new Map(); // request id -> {resolve, reject}
const rooms = new Map(); // room -> {nick, lastSeq}
const pending = new Map(); // cid -> {room, body, item}
let current = null; // the room shown
let resuming = false;
let leaving = false;

// ---- Connection ---------------------------------------------------------------------------

function status(text, down = false) {
  $('status').textContent = text;
  $('status').className = down ? 'down' : '';
}

function open(to) {
  return new Promise((resolve, reject) => {
    const s = new WebSocket(to);
    const timer = setTimeout(() => { s.close(); reject(new Error(`no answer from ${to}`)); }, CONNECT_TIMEOUT_MS);
    s.onopen = () => { clearTimeout(timer); resolve(s); };
    s.onerror = () => { clearTimeout(timer); reject(new Error(`cannot connect to ${to}`)); };
  });
}

function attach(s, to) {
  ws = s;
  url = to;
  s.onmessage = (e) => frame(JSON.parse(e.data));
  s.onclose = () => {
    for (const w of waiting.values()) w.reject({ code: 'disconnected', message: 'connection lost' });
    waiting.clear();
    if (ws === s) {
      ws = null;
      if (!leaving && me) resume(null);
    }
  };
}

// Send a request; resolves with its answer, rejects with its error frame.
function request(frameOut) {
  return new Promise((resolve, reject) => {
    if (!ws || ws.readyState !== WebSocket.OPEN) { reject({ code: 'disconnected', message: 'not connected' }); return; }
    const id = String(nextId++);
    waiting.set(id, { resolve, reject });
    ws.send(JSON.stringify({ ...frameOut, id }));
  });
}

function frame(f) {
  if (f.re !== undefined && waiting.has(f.re)) {
    const w = waiting.get(f.re);
    waiting.delete(f.re);
    if (f.op === 'error') w.reject(f);
    else w.resolve(f);
    return;
  }
  switch (f.op) {
    case 'message': message(f); break;
    case 'presence': if (f.room === current) line(`${f.nick} ${f.status === 'joined' ? 'joined' : f.status === 'kicked' ? 'was kicked' : 'left'}`); break;
    case 'subject': if (f.room === current) $('subject').textContent = f.subject; break;
    case 'destroyed': rooms.delete(f.room); if (f.room === current) line(`The room was destroyed: ${f.reason || ''}`); break;
    case 'moved': moved(f.room, f.to); break;
    case 'goaway': status(`node ${me.node} is going away: ${f.reason}`, true); resume(f.to); break;
    default: break;
  }
}

// ---- Login --------------------------------------------------------------------------------

async function hello(s, fields) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject({ code: 'timeout', message: 'no welcome' }), CONNECT_TIMEOUT_MS);
    s.onmessage = (e) => {
      const f = JSON.parse(e.data);
      clearTimeout(timer);
      if (f.op === 'welcome') resolve(f);
      else reject(f);
    };
    s.onclose = () => { clearTimeout(timer); reject({ code: 'disconnected', message: 'connection closed' }); };
    s.send(JSON.stringify({ op: 'hello', v: 1, id: 'h', ...fields }));
  });
}

$('login-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('login-error').textContent = '';
  asked = $('user').value.trim();
  const password = $('password').value;
  let s;
  try {
    const fields = password ? { user: asked, password } : { user: asked };
    // A registered user logs in on its home node: follow a welcome's redirect (at most 3), and
    // wait out a node's login budget (rate_limited with retry_after_ms; docs/protocol.md).
    let to = HERE, w, redirects = 0, retries = 0;
    for (;;) {
      s = await open(to);
      try {
        w = await hello(s, fields);
      } catch (err) {
        s.close();
        if (err.code !== 'rate_limited' || !err.retry_after_ms || ++retries > 30) throw err;
        await new Promise((r) => setTimeout(r, Math.min(err.retry_after_ms, 30000)));
        continue;
      }
      if (!w.redirect) break;
      s.close();
      if (++redirects > 3) throw { message: `too many redirects (last to ${w.redirect})` };
      to = w.redirect;
    }
    $('password').value = '';
    me = w;
    leaving = false;
    attach(s, to);
    status(`connected to node ${w.node} as ${w.user}`);
    $('login').hidden = true;
    $('app').hidden = false;
    $('logout').hidden = false;
    listRooms();
    $('create-name').focus();
  } catch (err) {
    if (s) s.close();
    $('login-error').textContent = `Login refused: ${err.message || err.code || err}`;
  }
});

$('logout').addEventListener('click', () => {
  leaving = true;
  me = null;
  rooms.clear();
  pending.clear();
  if (ws) ws.close(1000);
  location.reload();
});

// ---- Rooms --------------------------------------------------------------------------------

async function listRooms() {
  try {
    const r = await request({ op: 'list' });
    if (r.rooms.length === 0) { fill($('rooms'), el('li', { class: 'muted' }, 'No rooms yet: create one.')); return; }
    fill($('rooms'), r.rooms.map((x) => el('li', {},
      el('button', { type: 'button', dataset: { room: x.room }, onclick: () => join(x.room) }, x.room),
      ` ${x.subject || ''} (${x.last_seq} messages)`)));
  } catch (err) {
    $('lobby-error').textContent = `Could not list rooms: ${err.message}`;
  }
}

$('refresh').addEventListener('click', listRooms);

$('create-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const name = $('create-name').value.trim();
  const room = name.includes('@') ? name : `${name}@${me.service}`;
  $('lobby-error').textContent = '';
  try {
    await request({ op: 'create', room });
    $('create-name').value = '';
    await join(room);
    listRooms();
  } catch (err) {
    $('lobby-error').textContent = `Could not create ${room}: ${err.message}`;
  }
});

function nick() {
  return asked.replace(/[^\p{L}\p{N}._ -]/gu, '').slice(0, 32) || 'guest';
}

async function join(room) {
  $('room-error').textContent = '';
  if (!rooms.has(room)) {
    try {
      const j = await request({ op: 'join', room, nick: nick() });
      rooms.set(room, { nick: j.nick, lastSeq: 0, subject: j.subject });
      show(room, j);
      if (j.truncated) await catchUp(room);
    } catch (err) {
      $('lobby-error').textContent = `Could not join ${room}: ${err.message}`;
      return;
    }
  } else {
    show(room, null);
  }
  $('body').focus();
}

function show(room, joined) {
  if (current !== room) {
    current = room;
    fill($('messages'));
    fill($('outbox'));
    $('older').textContent = 'Load older messages';
  }
  $('room').hidden = false;
  $('room-title').textContent = room;
  $('subject').textContent = joined ? joined.subject || '' : rooms.get(room).subject || '';
}

// Page through `history` after the last seq seen (a join that replayed only part of it).
async function catchUp(room) {
  for (;;) {
    const r = rooms.get(room);
    const h = await request({ op: 'history', room, after: r.lastSeq, limit: 500 });
    for (const m of h.messages) message(m);
    if (!h.truncated || h.messages.length === 0) return;
  }
}

// ---- Messages -----------------------------------------------------------------------------

function message(m) {
  const r = rooms.get(m.room);
  if (!r || m.seq <= r.lastSeq) return; // a replay of what was seen already
  r.lastSeq = m.seq;
  if (m.from === me.user && pending.has(m.cid)) settled(m.cid);
  if (m.room !== current) return;
  $('messages').append(item(m));
  $('messages').lastElementChild.scrollIntoView({ block: 'nearest' });
}

function item(m) {
  return el('li', { dataset: { seq: m.seq, from: m.from } },
    el('time', { datetime: new Date(m.ts).toISOString() }, clock(m.ts).slice(11)), ' ',
    el('span', { class: 'nick' }, m.nick), ': ', el('span', { class: 'body' }, m.body));
}

// Older messages than the first one shown, from `history`.
$('older').addEventListener('click', async () => {
  const first = $('messages').querySelector('li[data-seq]');
  const before = first ? Number(first.dataset.seq) : (rooms.get(current) || { lastSeq: 0 }).lastSeq + 1;
  if (before <= 1) { $('older').textContent = 'This is the beginning of the room.'; return; }
  try {
    const h = await request({ op: 'history', room: current, before, limit: 50 });
    $('messages').prepend(...h.messages.map(item));
    if (h.messages.length === 0 || h.messages[0].seq <= 1) $('older').textContent = 'This is the beginning of the room.';
  } catch (err) {
    $('room-error').textContent = `Could not load older messages: ${err.message}`;
  }
});

function line(text) {
  $('messages').append(el('li', { class: 'system' }, text));
}

function settled(cid) {
  const p = pending.get(cid);
  if (p) p.item.remove();
  pending.delete(cid);
}

function newCid() {
  const b = crypto.getRandomValues(new Uint8Array(16));
  return [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
}

$('compose').addEventListener('submit', (e) => {
  e.preventDefault();
  const body = $('body').value;
  if (!body || !current) return;
  $('body').value = '';
  const cid = newCid();
  const item = el('li', { dataset: { cid } }, `sending: ${body}`);
  $('outbox').append(item);
  pending.set(cid, { room: current, body, item });
  post(cid);
});

// Send (or resend) one pending message; `unavailable` and a lost connection leave it pending
// for the resume, which resends it with the same cid.
async function post(cid) {
  const p = pending.get(cid);
  // While resuming, the rooms are not joined yet on the new connection: the resume sends it.
  if (!p || resuming) return;
  try {
    await request({ op: 'send', room: p.room, body: p.body, cid });
    settled(cid);
  } catch (err) {
    if (err.code === 'unavailable') setTimeout(() => post(cid), REJOIN_PAUSE_MS);
    else if (err.code !== 'disconnected') {
      p.item.className = 'failed';
      p.item.textContent = `not sent (${err.message}): ${p.body}`;
      pending.delete(cid);
    }
  }
}

// ---- Resume -------------------------------------------------------------------------------

function moved(room, to) {
  // The room is served elsewhere now: the simplest correct move is a whole resume there (a
  // page is in few rooms), which re-joins every room with `since`.
  status(`room ${room} moved to ${to}`, true);
  if (ws) { const old = ws; ws = null; old.onclose = null; old.close(); }
  resume(to);
}

async function resume(preferred) {
  if (resuming || !me) return;
  resuming = true;
  status('connection lost: resuming…', true);
  for (let round = 0; me && !leaving; round++) {
    const tries = [...new Set([preferred, ...(me.peers || []), url, HERE].filter(Boolean))];
    for (const to of tries) {
      try {
        const s = await open(to);
        let w;
        try {
          w = await hello(s, { user: me.user, token: me.session });
        } catch (err) {
          s.close();
          throw err;
        }
        me = { ...me, node: w.node, peers: w.peers, session: w.session || me.session };
        attach(s, to);
        await rejoin();
        status(`connected to node ${w.node} as ${me.user} (resumed)`);
        resuming = false;
        for (const cid of pending.keys()) post(cid);
        return;
      } catch (err) {
        status(`resuming: ${to}: ${err.message || err.code}`, true);
      }
    }
    await new Promise((r) => setTimeout(r, BACKOFF_MS[Math.min(round, BACKOFF_MS.length - 1)]));
  }
  resuming = false;
}

// Re-join every room with `since` = the last seq seen; a room still moving answers
// `unavailable`: try again after a pause.
async function rejoin() {
  for (const [room, r] of rooms) {
    for (;;) {
      try {
        const j = await request({ op: 'join', room, nick: r.nick, since: r.lastSeq });
        if (j.truncated) await catchUp(room);
        break;
      } catch (err) {
        if (err.code !== 'unavailable') {
          if (err.code === 'disconnected') throw err;
          if (room === current) line(`could not re-join: ${err.message}`);
          break;
        }
        await new Promise((res) => setTimeout(res, REJOIN_PAUSE_MS));
      }
    }
  }
}
