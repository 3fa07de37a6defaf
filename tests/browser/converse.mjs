// Converse.js in headless Debian Chromium (playwright-core), driven by the Rust integration
// tests (tests/cases/xmpp.rs) with one JSON command per line on stdin; one JSON event per line
// on stdout. Usage:
//   node converse.mjs --ws ws://127.0.0.1:PORT/xmpp-websocket --jid ann@localhost --password PW \
//        --room lobby@conference.localhost --nick Ann
// Events: {"event":"joined"} once the room's message box shows, then per command:
//   {"op":"send","body":B}           -> (nothing; the message shows in the room)
//   {"op":"wait_text","text":T}       -> {"event":"text","text":T} when a message with T shows
//   {"op":"reload"}                   -> a new browser context (no cached state) opens the page
//                                        again: {"event":"joined"}
//   {"op":"messages"}                 -> {"event":"messages","texts":[…]} (the room's messages, in order)
//   {"op":"quit"}
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const out = (event) => process.stdout.write(JSON.stringify(event) + '\n');
const here = path.dirname(fileURLToPath(import.meta.url));
const query = new URLSearchParams({ ws: args.ws, jid: args.jid, password: args.password || '', room: args.room, nick: args.nick });
const url = `file://${here}/index.html?${query}`;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

const browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--allow-file-access-from-files'] });
let context;
let page;

async function open() {
  if (context) await context.close();
  context = await browser.newContext();
  page = await context.newPage();
  page.on('console', (m) => process.stderr.write(`converse console: ${m.text()}\n`));
  page.on('pageerror', (e) => process.stderr.write(`converse page error: ${e}\n`));
  await page.goto(url);
  await page.waitForSelector('converse-muc textarea.chat-textarea', { timeout: 30000 });
  out({ event: 'joined' });
}

const texts = () => page.$$eval('converse-muc .chat-msg__text', (els) => els.map((e) => e.textContent.trim()));

try {
  await open();
  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    const cmd = JSON.parse(line);
    try {
      if (cmd.op === 'quit') break;
      if (cmd.op === 'send') {
        const box = page.locator('converse-muc textarea.chat-textarea');
        await box.fill(cmd.body);
        await box.press('Enter');
      } else if (cmd.op === 'wait_text') {
        await page.waitForFunction(
          (t) => [...document.querySelectorAll('converse-muc .chat-msg__text')].some((e) => e.textContent.includes(t)),
          cmd.text,
          { timeout: 20000 },
        );
        out({ event: 'text', text: cmd.text });
      } else if (cmd.op === 'messages') {
        out({ event: 'messages', texts: await texts() });
      } else if (cmd.op === 'reload') {
        await open();
      }
    } catch (e) {
      out({ event: 'error', op: cmd.op, text: String(e) });
    }
  }
} catch (e) {
  out({ event: 'error', op: 'start', text: String(e) });
} finally {
  await browser.close();
}
