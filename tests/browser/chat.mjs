// Stoa's chat page (src/web/chat.*) in headless Debian Chromium (playwright-core), one browser
// context per user, driven by the Rust integration tests (tests/cases/web.rs) with one JSON
// command per line on stdin; one JSON event per line on stdout. Usage:
//   node chat.mjs --url http://127.0.0.1:PORT/
// Commands (`who` names a browser context) and their events:
//   {"op":"open","who":W,"user":U[,"password":P][,"url":URL]} -> {"event":"logged_in","status":…}
//                                          | {"event":"refused","text":…} (a new context, at URL or --url)
//   {"op":"create","who":W,"room":NAME}   -> {"event":"joined","room":…}
//   {"op":"join","who":W,"room":ROOM}     -> {"event":"joined","room":…}
//   {"op":"send","who":W,"body":B}        -> {"event":"sent"} (typed and Enter pressed)
//   {"op":"wait_text","who":W,"text":T}   -> {"event":"text"} once a message with T shows
//   {"op":"wait_status","who":W,"text":T} -> {"event":"status","status":…} once the status has T
//   {"op":"messages","who":W}             -> {"event":"messages","list":[{seq,from,body}]}
//   {"op":"older","who":W}                -> {"event":"older","button":…} ("Load older messages" clicked)
//   {"op":"screenshot","who":W,"path":P}  -> {"event":"screenshot"}
//   {"op":"quit"}
import { args, launch, serve, WAIT } from './driver.mjs';

const browser = await launch();
const pages = new Map();
const problems = [];

async function run(cmd) {
  const page = pages.get(cmd.who);
  switch (cmd.op) {
    case 'open': {
      const context = await browser.newContext({ viewport: { width: 640, height: 800 } });
      const p = await context.newPage();
      p.on('console', (m) => process.stderr.write(`${cmd.who} console: ${m.text()}\n`));
      p.on('pageerror', (e) => { problems.push(String(e)); process.stderr.write(`${cmd.who} page error: ${e}\n`); });
      pages.set(cmd.who, p);
      await p.goto(cmd.url || args.url);
      await p.fill('#user', cmd.user);
      if (cmd.password) await p.fill('#password', cmd.password);
      await p.press('#user', 'Enter');
      await p.waitForFunction(() => !document.getElementById('app').hidden || document.getElementById('login-error').textContent !== '', null, { timeout: WAIT });
      if (await p.isVisible('#app')) return { event: 'logged_in', status: await p.textContent('#status') };
      return { event: 'refused', text: await p.textContent('#login-error') };
    }
    case 'create':
      await page.fill('#create-name', cmd.room);
      await page.press('#create-name', 'Enter');
      await page.waitForFunction(() => !document.getElementById('room').hidden, null, { timeout: WAIT });
      return { event: 'joined', room: await page.textContent('#room-title') };
    case 'join':
      await page.click('#refresh');
      await page.click(`button[data-room="${cmd.room}"]`, { timeout: WAIT });
      await page.waitForFunction((r) => document.getElementById('room-title').textContent === r, cmd.room, { timeout: WAIT });
      return { event: 'joined', room: cmd.room };
    case 'send':
      await page.fill('#body', cmd.body);
      await page.press('#body', 'Enter');
      return { event: 'sent' };
    case 'wait_text':
      await page.waitForFunction(
        (t) => [...document.querySelectorAll('#messages li .body')].some((e) => e.textContent === t),
        cmd.text,
        { timeout: cmd.timeout || WAIT },
      );
      return { event: 'text', text: cmd.text };
    case 'wait_status':
      await page.waitForFunction((t) => document.getElementById('status').textContent.includes(t), cmd.text, { timeout: cmd.timeout || WAIT });
      return { event: 'status', status: await page.textContent('#status') };
    case 'messages':
      return {
        event: 'messages',
        list: await page.$$eval('#messages li[data-seq]', (els) => els.map((e) => ({
          seq: Number(e.dataset.seq), from: e.dataset.from, body: e.querySelector('.body').textContent,
        }))),
        outbox: await page.$$eval('#outbox li', (els) => els.map((e) => e.textContent)),
        problems,
      };
    case 'older':
      await page.click('#older');
      await page.waitForFunction(() => document.getElementById('older').textContent !== 'Load older messages', null, { timeout: WAIT });
      return { event: 'older', button: await page.textContent('#older') };
    case 'screenshot':
      await page.screenshot({ path: cmd.path, fullPage: true });
      return { event: 'screenshot', path: cmd.path };
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

await serve(browser, run);
