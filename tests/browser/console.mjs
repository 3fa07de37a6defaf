// Stoa's operators' console (src/web/console.*) in headless Debian Chromium (playwright-core),
// driven by the Rust integration tests (tests/cases/web.rs) with one JSON command per line on
// stdin; one JSON event per line on stdout. Usage: node console.mjs --url http://127.0.0.1:PORT/
// Commands and their events:
//   {"op":"signin","token":T,"name":N}  -> {"event":"signed_in","who":…} | {"event":"refused","text":…}
//   {"op":"wait_state","node":ID,"state":S} -> {"event":"state"} once node ID's card shows S
//   {"op":"topology"}                 -> {"event":"topology","nodes":[{node,state,reason,rooms_hosted}]}
//   {"op":"action","action":A,"node":ID[,"service":S]} -> clicks the button, reads the
//                                        confirmation, confirms: {"event":"outcome","confirm":…,"outcome":…}
//   {"op":"history"}                  -> {"event":"history","items":[…]} (transitions, newest first)
//   {"op":"audit","filter":F}         -> {"event":"audit","rows":[{action,actor,outcome,target}]}
//   {"op":"room","search":S,"room":R} -> {"event":"room","list":[…],"text":…} (rooms tab, search, open R)
//   {"op":"tab","tab":T[,"wait":SEL][,"until":RE]} -> {"event":"tab","text":…} (once SEL shows and
//                                        the tab's text matches RE)
//   {"op":"screenshot","path":P}      -> {"event":"screenshot"}
//   {"op":"quit"}
import { args, launch, serve, WAIT } from './driver.mjs';

const browser = await launch();
const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
const page = await context.newPage();
const problems = [];
page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); process.stderr.write(`console: ${m.text()}\n`); });
page.on('pageerror', (e) => { problems.push(String(e)); process.stderr.write(`page error: ${e}\n`); });

async function run(cmd) {
  switch (cmd.op) {
    case 'open':
      await page.goto(args.url);
      await page.waitForSelector('#signin:not([hidden]), #app:not([hidden])', { timeout: WAIT });
      return { event: 'opened', problems };
    case 'signin': {
      await page.fill('#token', cmd.token);
      if (cmd.name) await page.fill('#name', cmd.name);
      await page.press('#token', 'Enter');
      await page.waitForFunction(() => !document.getElementById('app').hidden || document.getElementById('signin-error').textContent !== '', null, { timeout: WAIT });
      if (await page.isVisible('#app')) return { event: 'signed_in', who: await page.textContent('#who') };
      return { event: 'refused', text: await page.textContent('#signin-error'), app_hidden: await page.isHidden('#app') };
    }
    case 'wait_state':
      await page.waitForSelector(`section.node[data-node="${cmd.node}"][data-state="${cmd.state}"]`, { timeout: cmd.timeout || WAIT });
      return { event: 'state', node: cmd.node, state: cmd.state };
    case 'topology':
      return {
        event: 'topology',
        nodes: await page.$$eval('section.node', (els) => els.map((e) => ({
          node: e.dataset.node,
          state: e.dataset.state,
          text: e.innerText,
          rooms_hosted: e.querySelector('.rooms-hosted').textContent,
        }))),
      };
    case 'action': {
      let sel = `button[data-action="${cmd.action}"][data-node="${cmd.node}"]`;
      if (cmd.service) sel += `[data-service="${cmd.service}"]`;
      await page.locator(sel).first().click();
      await page.waitForSelector('#confirm[open]', { timeout: WAIT });
      const confirm = await page.textContent('#confirm-text');
      await page.click('#confirm-ok');
      await page.waitForFunction(() => /\b(done|refused)\b/.test(document.getElementById('outcome').textContent), null, { timeout: WAIT });
      return { event: 'outcome', confirm, outcome: await page.textContent('#outcome') };
    }
    case 'history':
      return { event: 'history', items: await page.$$eval('#history li', (els) => els.map((e) => e.textContent)) };
    case 'audit': {
      await page.click('#tabs button[data-tab="audit"]');
      await page.waitForSelector('#audit table, #audit p', { timeout: WAIT });
      if (cmd.filter) await page.fill('#audit-filter', cmd.filter);
      const rows = await page.$$eval('#audit tbody tr', (trs) => trs.map((tr) => ({
        action: tr.dataset.action,
        outcome: tr.dataset.outcome,
        actor: tr.querySelector('.actor').textContent,
        target: tr.children[4].textContent,
      })));
      return { event: 'audit', rows };
    }
    case 'room': {
      await page.click('#tabs button[data-tab="rooms"]');
      await page.fill('#room-search', cmd.search);
      await page.click(`#rooms button:text-is("${cmd.room}")`, { timeout: WAIT });
      await page.waitForSelector('#room-detail article', { timeout: WAIT });
      return { event: 'room', list: await page.$$eval('#rooms li', (els) => els.map((e) => e.textContent)), text: await page.innerText('#room-detail') };
    }
    case 'tab':
      await page.click(`#tabs button[data-tab="${cmd.tab}"]`);
      if (cmd.wait) await page.waitForSelector(cmd.wait, { timeout: WAIT });
      if (cmd.until) {
        await page.waitForFunction(([id, re]) => new RegExp(re).test(document.getElementById(id).innerText), [`tab-${cmd.tab}`, cmd.until], { timeout: WAIT });
      }
      return { event: 'tab', text: await page.innerText(`#tab-${cmd.tab}`) };
    case 'screenshot':
      await page.screenshot({ path: cmd.path, fullPage: true });
      return { event: 'screenshot', path: cmd.path };
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

await serve(browser, run);
