#!/usr/bin/env node
// Drives the admin in headless Chromium (Debian's package, through playwright-core; nothing is
// downloaded): log in, register a model from a running Cog server, read the schemas found,
// create it, change its price on its page, and report (JSON on stdout) what the pages showed.
//
//   node tests/browser/register_model.mjs --base-url URL --user U --password P --cog-url URL \
//        --owner O --name N --price 0.02 --new-price 0.05 [--screenshots DIR]
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opt } = parseArgs({
  options: {
    "base-url": { type: "string" },
    user: { type: "string" },
    password: { type: "string" },
    "cog-url": { type: "string" },
    owner: { type: "string" },
    name: { type: "string" },
    price: { type: "string" },
    "new-price": { type: "string" },
    screenshots: { type: "string" },
    executable: { type: "string", default: "/usr/bin/chromium" },
  },
});

const browser = await chromium.launch({
  executablePath: opt.executable,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const report = {};
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(20000);
  const shot = async (file) => {
    if (opt.screenshots) await page.screenshot({ path: `${opt.screenshots}/${file}`, fullPage: true });
  };
  const submit = async (selector) => {
    await Promise.all([page.waitForNavigation(), page.click(selector)]);
  };

  await page.goto(`${opt["base-url"]}/admin/login/`);
  await page.fill("#id_username", opt.user);
  await page.fill("#id_password", opt.password);
  await submit("input[type=submit]");
  // The navigation sidebar closed: wider pages in the screenshots.
  await page.evaluate(() => localStorage.setItem("django.admin.navSidebarIsOpen", "false"));

  await page.goto(`${opt["base-url"]}/admin/predictions/model/`);
  await submit("#register-from-cog");
  await page.fill("#id_cog_url", opt["cog-url"]);
  await page.fill("#id_owner", opt.owner);
  await page.fill("#id_name", opt.name);
  await page.fill("#id_description", "Shouts its text, on a Cog server");
  await page.selectOption("#id_pricing_mode", "flat");
  await page.fill("#id_price", opt.price);
  await page.selectOption("#id_settlement_policy", "after_success");
  await submit("#read-schema");
  report.input_schema = JSON.parse(await page.textContent("#input-schema"));
  report.output_schema = JSON.parse(await page.textContent("#output-schema"));
  await shot("admin-register-cog.png");

  await submit("#create-model");
  report.created_url = page.url();
  report.preview_before = JSON.parse(await page.textContent("#preview-v2"));

  await page.fill("#id_price", opt["new-price"]);
  await submit("input[name=_continue]");
  report.messages = await page.locator("ul.messagelist li").allTextContents();
  report.preview_after = JSON.parse(await page.textContent("#preview-v2"));
  if (opt.screenshots) {
    await page.locator("#preview-402").screenshot({ path: `${opt.screenshots}/admin-preview.png` });
  }

  await page.goto(`${opt["base-url"]}/admin/predictions/model/`);
  await shot("admin-prices.png");
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
