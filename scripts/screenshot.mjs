#!/usr/bin/env node
// Screenshot pages of the running app in headless Chromium (Debian's package), logged in to
// the admin first when a user is given.
//
//   node scripts/screenshot.mjs --base-url http://127.0.0.1:8000 --user admin --password admin \
//        /admin/predictions/model/=docs/img/admin-prices.png  /other/path=out.png ...
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    "base-url": { type: "string", default: "http://127.0.0.1:8000" },
    user: { type: "string" },
    password: { type: "string" },
    width: { type: "string", default: "1400" },
    height: { type: "string", default: "800" },
    executable: { type: "string", default: "/usr/bin/chromium" },
    accept: { type: "string", default: "text/html" },
  },
});

const browser = await chromium.launch({
  executablePath: values.executable,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: Number(values.width), height: Number(values.height) } });
if (values.user) {
  await page.goto(`${values["base-url"]}/admin/login/`);
  await page.fill("#id_username", values.user);
  await page.fill("#id_password", values.password);
  await Promise.all([page.waitForNavigation(), page.click("input[type=submit]")]);
}
for (const spec of positionals) {
  const cut = spec.lastIndexOf("=");  // the path may hold a query string with "=" in it
  const [path, out] = [spec.slice(0, cut), spec.slice(cut + 1)];
  const response = await page.goto(`${values["base-url"]}${path}`, { extraHTTPHeaders: { Accept: values.accept } });
  await page.screenshot({ path: out, fullPage: true });
  console.log(`${path} -> ${out} (HTTP ${response.status()})`);
}
await browser.close();
