// Helpers shared by the console and the chat page: building DOM nodes (text only, never
// HTML strings, so nothing a server or a user sends can become markup), and times.

// el('p', {class: 'x', dataset: {seq: 3}}, 'text', child) -> <p class="x" data-seq="3">
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'onclick') node.addEventListener('click', v);
    else if (k === 'text') node.textContent = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

// Replace a node's children.
export function fill(node, ...children) {
  node.replaceChildren();
  for (const c of children.flat()) if (c !== undefined && c !== null && c !== false) node.append(c);
}

// 2026-12-05 21:17:03 (local time).
export function clock(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

// 3 h 12 min, 4 min 2 s, 12 s.
export function duration(ms) {
  if (ms === null || ms === undefined || ms < 0) return '';
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

// "3 rooms", "1 room".
export function count(n, what) {
  return `${n} ${what}${n === 1 ? '' : 's'}`;
}
