#!/usr/bin/env node
// Start a ledger export from the admin's form in headless Chromium (Debian's package) and
// screenshot its job page while it runs (the page refreshes itself every 2 s).
//
//   node scripts/screenshot_export.mjs --base-url http://127.0.0.1:8000 --user finn --password pw \
//        --wait-ms 2500 --out docs/img/finance-export-progress.png
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values } = parseArgs({
  options: {
    "base-url": { type: "string", default: "http://127.0.0.1:8000" },
    user: { type: "string" },
    password: { type: "string" },
    "wait-ms": { type: "string", default: "2500" },
    out: { type: "string" },
    executable: { type: "string", default: "/usr/bin/chromium" },
  },
});

const browser = await chromium.launch({
  executablePath: values.executable,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
await page.goto(`${values["base-url"]}/admin/login/`);
await page.fill("#id_username", values.user);
await page.fill("#id_password", values.password);
await Promise.all([page.waitForNavigation(), page.click("input[type=submit]")]);
await page.goto(`${values["base-url"]}/admin/payments/payment/export/`);
await page.selectOption("#id_format", "csv");
await Promise.all([page.waitForNavigation(), page.click("#export-form input[type=submit]")]);
const job = page.url();
let text = "";
const deadline = Date.now() + 60000;
// Wait until the worker has taken the job and reported progress, then give it a moment.
while (Date.now() < deadline) {
  await page.goto(job);
  text = await page.locator(".field-progress .readonly").innerText();
  if (/ of \d+/.test(text)) break;
  await page.waitForTimeout(200);
}
await page.waitForTimeout(Number(values["wait-ms"]));
await page.goto(job);
text = await page.locator(".field-progress .readonly").innerText();
await page.screenshot({ path: values.out, fullPage: true });
console.log(JSON.stringify({ job, progress: text }));
await browser.close();
