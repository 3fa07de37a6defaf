// What the page drivers (chat.mjs, console.mjs) share: their arguments, headless Debian Chromium
// (playwright-core; CHROMIUM overrides the path), and the command loop: one JSON command per
// line on stdin, answered by one JSON event per line on stdout; a failed command answers
// {"event":"error","op":…,"text":…} and the loop goes on; {"op":"quit"} ends it.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

export const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
export const out = (event) => process.stdout.write(JSON.stringify(event) + '\n');
export const WAIT = 30000;

export async function launch() {
  return chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox'] });
}

// Serve commands with `run(cmd)` (which returns the event) until quit, then close `browser`.
export async function serve(browser, run) {
  try {
    for await (const line of createInterface({ input: process.stdin })) {
      const cmd = JSON.parse(line);
      if (cmd.op === 'quit') break;
      try {
        out(await run(cmd));
      } catch (e) {
        out({ event: 'error', op: cmd.op, text: String(e) });
      }
    }
  } finally {
    await browser.close();
  }
}
