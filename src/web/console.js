// The operators' console (docs/operations.md, "Console"). Signs in with the admin token to a
// cookie session, then calls the admin API as `stoa admin` does, with the session's CSRF
// token on every state-changing call, and follows the node's state over server-sent events.
import { el, fill, clock, duration, count } from './common.js';

const $ = (id) => document.getElementById(id);
let session = null; // {actor, csrf, node, critical_service_down_delay_ms}
let topology = null;
let events = null;
const transitions = [];

// ---- API ----------------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = session ? session.csrf : '';
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: 'same-origin' });
  let data = null;
  try { data = await r.json(); } catch { data = null; }
  if (r.status === 401 && session) signedOut('Your console session ended: sign in again.');
  return { ok: r.ok, status: r.status, data: data || {} };
}

// ---- Sign-in ------------------------------------------------------------------------------

async function start() {
  const r = await api('GET', '/api/console/session');
  if (r.ok) signedIn(r.data);
  else signedOut('');
}

function signedOut(message) {
  session = null;
  if (events) events.close();
  events = null;
  $('app').hidden = true;
  $('logout').hidden = true;
  $('live').hidden = true;
  $('who').textContent = '';
  $('signin').hidden = false;
  $('signin-error').textContent = message;
  $('token').focus();
}

function signedIn(s) {
  session = s;
  $('signin').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  $('who').textContent = `${s.actor} on node ${s.node}`;
  document.title = `Stoa console: ${s.node}`;
  follow();
  showTab('topology');
}

$('signin-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('signin-error').textContent = '';
  const body = { token: $('token').value };
  if ($('name').value) body.name = $('name').value;
  const r = await api('POST', '/api/console/login', body);
  $('token').value = '';
  if (!r.ok) {
    $('signin-error').textContent = `Sign-in refused: ${r.data.message || r.status}`;
    return;
  }
  const s = await api('GET', '/api/console/session');
  if (s.ok) signedIn(s.data);
  else $('signin-error').textContent = 'Signed in, but the session cookie was not kept (cookies blocked?)';
});

$('logout').addEventListener('click', async () => {
  await api('POST', '/api/console/logout');
  signedOut('Signed out.');
});

// ---- Tabs ---------------------------------------------------------------------------------

const loaders = { rooms: loadRooms, plugins: loadPlugins, audit: loadAudit, jobs: loadJobs, metrics: () => {} };

function showTab(name) {
  for (const b of document.querySelectorAll('#tabs button')) {
    if (b.dataset.tab === name) b.setAttribute('aria-current', 'page');
    else b.removeAttribute('aria-current');
  }
  for (const p of document.querySelectorAll('[data-panel]')) p.hidden = p.dataset.panel !== name;
  if (loaders[name]) loaders[name]();
}

for (const b of document.querySelectorAll('#tabs button')) b.addEventListener('click', () => showTab(b.dataset.tab));

// ---- Live state ---------------------------------------------------------------------------

function follow() {
  if (events) events.close();
  events = new EventSource('/api/events');
  events.addEventListener('open', () => { $('live').hidden = false; });
  events.addEventListener('error', () => { $('live').hidden = true; });
  events.addEventListener('topology', (e) => {
    topology = JSON.parse(e.data);
    if (!pressing) renderTopology();
  });
  events.addEventListener('history', (e) => {
    for (const t of JSON.parse(e.data)) transitions.unshift(t);
    transitions.splice(200);
    renderHistory();
  });
}

// A button replaced between a press and its release gets no click: the topology waits for
// the release to redraw.
let pressing = false;
document.addEventListener('pointerdown', () => { pressing = true; });
document.addEventListener('pointerup', () => { pressing = false; if (topology) setTimeout(renderTopology, 0); });
document.addEventListener('pointercancel', () => { pressing = false; });

const STATE_CLASS = (s) => {
  if (!s) return 'unknown';
  if (s === 'normal') return 'ok';
  if (s.startsWith('running_in_backup')) return 'backup';
  if (s.startsWith('failed_over') || s === 'unknown') return 'bad';
  return 'changing';
};

function renderTopology() {
  const groups = topology.groups || [];
  if (groups.length === 0) {
    fill($('groups'), el('p', { class: 'empty' }, `Node ${topology.node} is in no group (a single node: no failover, no fallback).`));
    return;
  }
  const now = Date.now();
  // Keep the keyboard focus on the same button across a re-render.
  const f = document.activeElement && document.activeElement.dataset ? { ...document.activeElement.dataset } : {};
  fill($('groups'), groups.map((g) => el('article', { class: 'group' },
    el('h2', {}, `Group ${g.name}`, g.ha ? ' (redundancy pair)' : ''),
    el('div', { class: 'nodes' }, g.nodes.map((n) => nodeCard(g, n, now))),
  )));
  if (f.action) {
    const same = [...$('groups').querySelectorAll('button')]
      .find((b) => b.dataset.action === f.action && b.dataset.node === f.node && b.dataset.service === f.service);
    if (same) same.focus();
  }
}

function nodeCard(group, n, now) {
  const peer = group.nodes.find((o) => o.id !== n.id);
  const lease = n.lease && !n.lease.error
    ? (n.lease.expired ? `expired (${n.lease.holder})` : `${n.lease.remaining_ms} ms left (${n.lease.holder})`)
    : 'none';
  const reach = n.this_node ? 'this node' : (n.link ? (n.link.reachable ? 'reachable' : 'unreachable') : 'not linked');
  const services = n.services
    ? n.services.map((s) => el('li', {},
      el('span', { class: s.running ? 'ok' : 'bad' }, `${s.service}: ${s.running ? 'running' : 'stopped'}`),
      s.down_for_ms ? ` (down ${duration(s.down_for_ms)})` : '',
      ' ',
      serviceButton(n, s.service, !s.running)))
    : ['rooms', 'router', 'store'].map((svc) => el('li', {}, `${svc}: `,
      // The peer's services as its last heartbeat said.
      !(n.link && n.link.reachable) ? el('span', {}, 'unknown (no heartbeat)')
        : n.link.services_down.includes(svc) ? el('span', { class: 'bad' }, 'down') : el('span', { class: 'ok' }, 'running'),
      ' ', serviceButton(n, svc, false), ' ', serviceButton(n, svc, true)));
  return el('section', { class: `node state-${STATE_CLASS(n.state)}`, dataset: { node: n.id, state: n.state || '' } },
    el('h3', {}, `Node ${n.id}`),
    el('p', { class: 'state' }, el('strong', { class: 'badge' }, n.state || 'unknown'), n.reason ? ` because ${n.reason}` : ''),
    el('dl', {},
      el('dt', {}, 'Since'), el('dd', {}, n.since_ms ? `${clock(n.since_ms)} (${duration(now - n.since_ms)})` : '–'),
      el('dt', {}, 'Rooms hosted'), el('dd', { class: 'rooms-hosted' }, n.rooms_hosted ?? '–'),
      el('dt', {}, 'Users connected'), el('dd', {}, n.users_connected ?? '–'),
      el('dt', {}, 'Lease'), el('dd', {}, lease),
      el('dt', {}, 'Peer link'), el('dd', {}, reach),
      el('dt', {}, 'Client URL'), el('dd', {}, n.client || '–'),
    ),
    el('h4', {}, 'Critical services'),
    el('ul', { class: 'services' }, services),
    group.ha ? el('p', { class: 'buttons' },
      el('button', { type: 'button', class: 'danger', dataset: { action: 'failover', node: n.id }, onclick: () => act('failover', n, peer) }, `Fail ${n.id} over`),
      el('button', { type: 'button', dataset: { action: 'fallback', node: n.id }, onclick: () => act('fallback', n, peer) }, `Fall back to ${n.id}`),
    ) : null,
  );
}

function serviceButton(n, service, start) {
  const action = start ? 'start' : 'stop';
  return el('button', {
    type: 'button', class: start ? '' : 'danger', dataset: { action: `service_${action}`, node: n.id, service },
    onclick: () => act(`service_${action}`, n, null, service),
  }, `${start ? 'Start' : 'Stop'} ${service}`);
}

function renderHistory() {
  if (transitions.length === 0) return;
  fill($('history'), transitions.map((t) => el('li', { class: STATE_CLASS(t.state) },
    el('time', {}, clock(t.at_ms)), ` node ${t.node}: `, el('strong', {}, t.state), t.reason ? ` (${t.reason})` : '')));
}

// ---- Actions ------------------------------------------------------------------------------

// What an action will do, in words, with the numbers the console has now.
// The other node of n's group, as the topology shows it now.
function peerOf(n) {
  for (const g of (topology && topology.groups) || []) {
    if (g.nodes.some((o) => o.id === n.id)) return g.nodes.find((o) => o.id !== n.id) || null;
  }
  return null;
}

function consequence(kind, n, peer, service) {
  const users = n.users_connected ?? 0;
  const rooms = n.rooms_hosted ?? 0;
  const other = peer ? peer.id : 'its peer';
  const delay = session.critical_service_down_delay_ms;
  switch (kind) {
    case 'service_stop':
      return `Stop the critical service "${service}" on node ${n.id}. After ${duration(delay)} ` +
        `(cluster.critical_service_down_delay_ms) node ${n.id} fails over: its ${count(rooms, 'room')} move to node ${other}, ` +
        `and the ${count(users, 'user')} connected to ${n.id} are told to resume there. ` +
        `It stays failed over until you start the service and fall back.`;
    case 'service_start':
      return `Start the critical service "${service}" on node ${n.id}. A node that failed over stays failed over until you fall back.`;
    case 'failover':
      return `Fail node ${n.id} over to node ${other}: its ${count(rooms, 'room')} move to ${other} (their clients resume there), ` +
        `and the ${count(users, 'user')} connected to ${n.id} are told to reconnect to ${other}.`;
    case 'fallback':
      return `Fall back to node ${n.id}: the rooms of ${n.id} that node ${other} hosts now (${other} hosts ` +
        `${count(peer ? peer.rooms_hosted ?? 0 : 0, 'room')} in all) return to ${n.id}; their occupants ` +
        `(of the ${count(peer ? peer.users_connected ?? 0 : 0, 'user')} connected to ${other}) resume on ${n.id}.`;
    default:
      return kind;
  }
}

function confirmDialog(title, text, verb) {
  return new Promise((resolve) => {
    const d = $('confirm');
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-ok').textContent = verb;
    const done = (answer) => {
      d.close();
      $('confirm-ok').removeEventListener('click', ok);
      $('confirm-cancel').removeEventListener('click', cancel);
      d.removeEventListener('cancel', cancel);
      resolve(answer);
    };
    const ok = () => done(true);
    const cancel = () => done(false);
    $('confirm-ok').addEventListener('click', ok);
    $('confirm-cancel').addEventListener('click', cancel);
    d.addEventListener('cancel', cancel);
    d.showModal();
    $('confirm-cancel').focus();
  });
}

function outcome(ok, text) {
  const o = $('outcome');
  o.className = ok ? 'ok' : 'bad';
  o.textContent = text;
}

async function act(kind, n, givenPeer, service) {
  const peer = givenPeer || peerOf(n);
  const title = { service_stop: 'Stop a critical service', service_start: 'Start a critical service', failover: 'Manual failover', fallback: 'Fallback' }[kind];
  const verb = { service_stop: `Stop ${service}`, service_start: `Start ${service}`, failover: `Fail ${n.id} over`, fallback: `Fall back to ${n.id}` }[kind];
  if (!await confirmDialog(title, consequence(kind, n, peer, service), verb)) {
    outcome(true, `${title}: cancelled, nothing done.`);
    return;
  }
  const path = kind.startsWith('service_')
    ? `/api/nodes/${encodeURIComponent(n.id)}/services/${service}/${kind.slice(8)}`
    : `/api/nodes/${encodeURIComponent(n.id)}/${kind}`;
  outcome(true, `${title}: asking node ${topology.node}…`);
  const r = await api('POST', path);
  outcome(r.ok, `${title} ${r.ok ? 'done' : 'refused'}: ${r.data.message || r.status}`);
}

// ---- Rooms --------------------------------------------------------------------------------

let roomList = [];

async function loadRooms() {
  const r = await api('GET', '/api/rooms?limit=1000');
  if (!r.ok) { fill($('rooms'), el('li', { class: 'error' }, `Could not list rooms: ${r.data.message || r.status}`)); return; }
  roomList = r.data.rooms;
  $('rooms-count').textContent = `${count(r.data.total, 'room')} in the store, ${r.data.active_rooms} active on this node` +
    (r.data.total > roomList.length ? ` (searching the first ${roomList.length})` : '');
  renderRooms();
}

function renderRooms() {
  const q = $('room-search').value.trim().toLowerCase();
  const shown = roomList.filter((r) => r.room.toLowerCase().includes(q));
  if (shown.length === 0) { fill($('rooms'), el('li', { class: 'empty' }, q ? `No room matches "${q}".` : 'No rooms yet.')); return; }
  fill($('rooms'), shown.slice(0, 200).map((r) => el('li', {},
    el('button', { type: 'button', class: 'link', onclick: () => showRoom(r.room) }, r.room),
    ` host ${r.host_node}, epoch ${r.epoch}, ${count(r.last_seq, 'message')}`, r.active ? `, ${count(r.occupants, 'occupant')}` : ', inactive')));
}

$('room-search').addEventListener('input', renderRooms);

async function showRoom(room) {
  const [r, m] = await Promise.all([
    api('GET', `/api/rooms/${encodeURIComponent(room)}`),
    api('GET', `/api/rooms/${encodeURIComponent(room)}/messages?limit=20`),
  ]);
  if (!r.ok) { fill($('room-detail'), el('p', { class: 'error' }, `Room ${room}: ${r.data.message || r.status}`)); return; }
  const d = r.data;
  const affiliations = Object.entries(d.affiliations || {});
  const messages = m.ok ? m.data.messages : [];
  fill($('room-detail'), el('article', { class: 'room' },
    el('h2', {}, d.room),
    el('dl', {},
      el('dt', {}, 'Home / host node'), el('dd', {}, `${d.home_node} / ${d.host_node}`),
      el('dt', {}, 'Epoch'), el('dd', {}, d.epoch),
      el('dt', {}, 'Messages'), el('dd', {}, d.last_seq),
      el('dt', {}, 'Created'), el('dd', {}, clock(d.created_at)),
    ),
    el('h3', {}, 'Configuration'),
    el('pre', {}, JSON.stringify(d.config, null, 2)),
    el('h3', {}, 'Occupants on this node'),
    d.live && d.live.occupant_list.length
      ? el('ul', { class: 'occupants' }, d.live.occupant_list.slice(0, 200).map((o) => el('li', {}, `${o.nick} (${o.user})`)))
      : el('p', { class: 'empty' }, d.live ? 'Nobody is in the room.' : 'The room is not active on this node.'),
    el('h3', {}, 'Affiliations'),
    affiliations.length ? el('ul', {}, affiliations.map(([u, a]) => el('li', {}, `${u}: ${a}`))) : el('p', { class: 'empty' }, 'None.'),
    el('h3', {}, 'Last messages'),
    messages.length
      ? el('ol', { class: 'messages' }, messages.map((x) => el('li', {}, el('time', {}, clock(x.ts)), ` #${x.seq} ${x.nick}: ${x.body}`)))
      : el('p', { class: 'empty' }, 'No messages.'),
  ));
}

// ---- Plugins ------------------------------------------------------------------------------

async function loadPlugins() {
  const r = await api('GET', '/api/plugins');
  if (!r.ok) { fill($('plugins'), el('p', { class: 'empty' }, r.data.message || `No plugins (${r.status}).`)); return; }
  const list = r.data.plugins || [];
  fill($('plugins'),
    el('p', { class: 'muted' }, `Plugin directory: ${r.data.dir}`),
    list.length === 0 ? el('p', { class: 'empty' }, 'No plugin loaded.') : el('table', {},
      el('thead', {}, el('tr', {}, ['Plugin', 'Generation', 'Calls', 'Faults', 'Last fault', ''].map((h) => el('th', {}, h)))),
      el('tbody', {}, list.map((p) => el('tr', {},
        el('td', {}, p.name), el('td', {}, p.generation), el('td', {}, p.calls),
        el('td', { class: p.recent_faults ? 'bad' : '' }, `${p.faults} (${p.recent_faults} recent, disabled in ${count(p.disabled_rooms, 'room')})`),
        el('td', {}, p.last_fault || '–'),
        el('td', {},
          el('button', { type: 'button', onclick: () => pluginAction('reload', p.name) }, 'Reload'), ' ',
          el('button', { type: 'button', class: 'danger', onclick: () => pluginAction('unload', p.name) }, 'Unload')))))));
}

async function pluginAction(action, name) {
  const text = {
    load: `Load plugin ${name} from the plugin directory; rooms that name it start using it.`,
    reload: `Reload plugin ${name} from its file; rooms switch to the new code at their next call.`,
    unload: `Unload plugin ${name}; rooms that name it run without it (or refuse, if it fails closed).`,
  }[action];
  if (!await confirmDialog(`Plugin ${action}`, text, `${action[0].toUpperCase()}${action.slice(1)} ${name}`)) return;
  const r = await api('POST', `/api/plugins/${encodeURIComponent(name)}/${action}`);
  outcome(r.ok, `Plugin ${name} ${action}: ${r.ok ? 'done' : r.data.message || r.status}`);
  loadPlugins();
}

$('plugin-load').addEventListener('submit', (e) => {
  e.preventDefault();
  const name = $('plugin-name').value.trim();
  if (name) pluginAction('load', name);
});

// ---- Audit log ----------------------------------------------------------------------------

let auditRows = [];

async function loadAudit() {
  const r = await api('GET', '/api/audit?limit=500');
  if (!r.ok) { fill($('audit'), el('p', { class: 'error' }, r.data.message || String(r.status))); return; }
  auditRows = r.data.entries;
  renderAudit();
}

function renderAudit() {
  const q = $('audit-filter').value.trim().toLowerCase();
  const rows = auditRows.filter((a) => !q || [a.action, a.actor, a.target, a.outcome, a.node].join(' ').toLowerCase().includes(q));
  if (rows.length === 0) { fill($('audit'), el('p', { class: 'empty' }, q ? 'No entry matches.' : 'The audit log is empty.')); return; }
  fill($('audit'), el('table', { class: 'audit' },
    el('thead', {}, el('tr', {}, ['When', 'Node', 'Who', 'Action', 'Target', 'Outcome', 'Detail'].map((h) => el('th', {}, h)))),
    el('tbody', {}, rows.map((a) => el('tr', { dataset: { action: a.action, outcome: a.outcome } },
      el('td', {}, clock(a.at_ms)), el('td', {}, a.node), el('td', { class: 'actor' }, a.actor), el('td', {}, a.action),
      el('td', {}, a.target), el('td', { class: a.outcome === 'done' ? 'ok' : 'bad' }, a.outcome),
      el('td', {}, a.detail && a.detail.message ? a.detail.message : JSON.stringify(a.detail)))))));
}

$('audit-filter').addEventListener('input', renderAudit);

// ---- Merge jobs ---------------------------------------------------------------------------

// "rooms 3, messages 1200" from a job's counts (any shape the job recorded).
function counts(c) {
  if (!c || typeof c !== 'object') return c ? String(c) : '';
  return Object.entries(c).filter(([, v]) => typeof v !== 'object').map(([k, v]) => `${k} ${v}`).join(', ');
}

async function loadJobs() {
  const r = await api('GET', '/api/db/jobs');
  if (!r.ok) { fill($('jobs'), el('p', { class: 'error' }, r.data.message || String(r.status))); return; }
  const jobs = r.data.jobs || [];
  if (jobs.length === 0) { fill($('jobs'), el('p', { class: 'empty' }, 'No merge job has run against this store.')); return; }
  fill($('jobs'), el('table', { class: 'audit' },
    el('thead', {}, el('tr', {}, ['Job', 'State', 'Started', 'Took', 'Sources → target', 'Counts', 'Error'].map((h) => el('th', {}, h)))),
    el('tbody', {}, jobs.map((j) => el('tr', { dataset: { job: j.id, state: j.state } },
      el('td', {}, j.id), el('td', { class: j.state === 'done' ? 'ok' : j.state === 'running' ? '' : 'bad' }, j.state),
      el('td', {}, clock(j.started_ms)), el('td', {}, j.finished_ms ? duration(j.finished_ms - j.started_ms) : ''),
      el('td', {}, j.sources && j.sources.sources ? `${j.sources.sources.join(', ')} → ${j.sources.target}` : ''),
      el('td', {}, counts(j.counts)), el('td', {}, j.error || ''))))));
}

// ---- Metrics ------------------------------------------------------------------------------

const SAMPLES = 60;
const samples = [];

// The sum of every series of `name` in a Prometheus text page.
function metric(text, name) {
  let sum = 0;
  let found = false;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== ' ' && rest[0] !== '{') continue;
    const v = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (Number.isFinite(v)) { sum += v; found = true; }
  }
  return found ? sum : null;
}

async function sample() {
  if (!session) return;
  let text;
  try {
    const r = await fetch('/metrics', { credentials: 'same-origin' });
    if (!r.ok) return;
    text = await r.text();
  } catch { return; }
  samples.push({
    t: Date.now(),
    messages: metric(text, 'stoa_messages_committed_total'),
    deliveries: metric(text, 'stoa_deliveries_total'),
    commitSum: metric(text, 'stoa_commit_seconds_sum'),
    commitCount: metric(text, 'stoa_commit_seconds_count'),
    connections: metric(text, 'stoa_connections'),
  });
  samples.splice(0, Math.max(0, samples.length - SAMPLES - 1));
  if (!$('tab-metrics').hidden) renderCharts();
}

function series() {
  // A counter shows up on /metrics at its first increment: absent is 0.
  const rate = (k) => samples.slice(1).map((s, i) => {
    const p = samples[i];
    return Math.max(0, ((s[k] ?? 0) - (p[k] ?? 0)) / ((s.t - p.t) / 1000));
  });
  const latency = samples.slice(1).map((s, i) => {
    const p = samples[i];
    const n = (s.commitCount ?? 0) - (p.commitCount ?? 0);
    return n > 0 ? ((s.commitSum - p.commitSum) / n) * 1000 : 0;
  });
  return [
    ['Messages committed / s', rate('messages'), (v) => v.toFixed(1)],
    ['Deliveries / s', rate('deliveries'), (v) => v.toFixed(1)],
    ['Commit latency, ms (mean)', latency, (v) => v.toFixed(2)],
    ['Client connections', samples.slice(1).map((s) => s.connections ?? 0), (v) => String(Math.round(v))],
  ];
}

const SVG = 'http://www.w3.org/2000/svg';

function chart(title, values, format) {
  const w = 300;
  const h = 60;
  const max = Math.max(1e-9, ...values);
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', `${title}: now ${values.length ? format(values[values.length - 1]) : 'no data'}`);
  const axis = document.createElementNS(SVG, 'line');
  for (const [k, v] of [['x1', 0], ['y1', h - 1], ['x2', w], ['y2', h - 1], ['class', 'axis']]) axis.setAttribute(k, v);
  svg.append(axis);
  const line = document.createElementNS(SVG, 'polyline');
  const step = w / Math.max(1, values.length - 1);
  line.setAttribute('points', values.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / max) * (h - 4)).toFixed(1)}`).join(' '));
  svg.append(line);
  if (values.length) {
    // The latest value as a dot: visible from the first sample on.
    const dot = document.createElementNS(SVG, 'circle');
    const last = values[values.length - 1];
    for (const [k, v] of [['cx', (values.length - 1) * step], ['cy', h - 2 - (last / max) * (h - 4)], ['r', 2.5]]) dot.setAttribute(k, v.toFixed(1));
    svg.append(dot);
  }
  const now = values.length ? format(values[values.length - 1]) : '–';
  return el('figure', { class: 'chart' }, el('figcaption', {}, `${title}: `, el('strong', {}, now), ` (max ${format(max)})`), svg);
}

function renderCharts() {
  if (samples.length < 2) { fill($('charts'), el('p', { class: 'empty' }, 'Collecting samples…')); return; }
  fill($('charts'), series().map(([t, v, f]) => chart(t, v, f)));
}

loaders.metrics = renderCharts;
setInterval(sample, 2000);

start();
