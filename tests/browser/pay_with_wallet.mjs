#!/usr/bin/env node
// A person paying on the paywall page with a browser wallet, in headless Chromium (Debian's
// package, driven by playwright-core; nothing is downloaded). The wallet is an EIP-1193 provider
// injected into the page that forwards to the test anvil, whose dev accounts sign typed data
// (eth_signTypedData_v4). It starts on another chain (1), so the page must switch it.
//
//   node tests/browser/pay_with_wallet.mjs --url http://127.0.0.1:8000/v1/models/demo/echo-text/predictions \
//        --rpc http://127.0.0.1:8545 --account 0x... --field text=hello --screenshot out.png
//
// Prints one JSON line: {state, output, details, steps, methods, errors}.
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    rpc: { type: "string" },
    account: { type: "string" },
    field: { type: "string", multiple: true, default: [] },
    screenshot: { type: "string" },
    executable: { type: "string", default: "/usr/bin/chromium" },
    timeout: { type: "string", default: "90000" },
  },
});

let id = 0;
async function rpc(method, params) {
  const response = await fetch(values.rpc, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: ++id, method, params }),
  });
  const body = await response.json();
  if (body.error) return { error: body.error };
  return { result: body.result };
}

const anvilChain = (await rpc("eth_chainId", [])).result;
let walletChain = "0x1";
const methods = [];

// The wallet's side of EIP-1193: accounts and chain switching are the wallet's own business,
// everything else goes to the node of the chain it is on.
async function wallet(method, params) {
  methods.push(method);
  switch (method) {
    case "eth_requestAccounts":
    case "eth_accounts":
      return { result: [values.account] };
    case "eth_chainId":
      return { result: walletChain };
    case "wallet_switchEthereumChain":
      if (BigInt(params[0].chainId) !== BigInt(anvilChain)) {
        return { error: { code: 4902, message: "Unrecognized chain ID" } };
      }
      walletChain = anvilChain;
      return { result: null };
    default:
      if (walletChain !== anvilChain) return { error: { code: 4901, message: "wallet is on chain 1" } };
      return rpc(method, params);
  }
}

const browser = await chromium.launch({
  executablePath: values.executable,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  page.on("pageerror", (err) => errors.push(String(err)));
  // Chromium logs every non-2xx answer; the 402s (the page, the price of this input) are the point.
  page.on("console", (msg) => {
    if (msg.type() === "error" && !/status of 402|favicon/.test(msg.text() + msg.location().url)) {
      errors.push(`${msg.text()} (${msg.location().url})`);
    }
  });
  // Every request the page makes must stay on our own site (no CDN, no third-party RPC).
  const origin = new URL(values.url).origin;
  page.on("request", (request) => {
    if (!request.url().startsWith(origin) && !request.url().startsWith("data:")) {
      errors.push(`request off site: ${request.url()}`);
    }
  });
  await page.exposeFunction("__testWallet", wallet);
  await page.addInitScript(() => {
    const listeners = {};
    window.ethereum = {
      async request({ method, params }) {
        const answer = await window.__testWallet(method, params ?? []);
        if (answer.error) throw Object.assign(new Error(answer.error.message), { code: answer.error.code });
        return answer.result;
      },
      on(event, fn) {
        (listeners[event] ||= []).push(fn);
      },
      removeListener(event, fn) {
        listeners[event] = (listeners[event] || []).filter((f) => f !== fn);
      },
    };
  });

  const response = await page.goto(values.url);
  if (response.status() !== 402) throw new Error(`the page answered ${response.status()}, not 402`);
  for (const spec of values.field) {
    const at = spec.indexOf("=");
    await page.fill(`#input-${spec.slice(0, at)}`, spec.slice(at + 1));
  }
  await page.click("#connect");
  await page.waitForSelector("#pay:enabled");
  await page.click("#pay");
  const timeout = Number(values.timeout);
  await page.waitForSelector("#result[data-state=succeeded], #result[data-state=failed], #steps li.failed", {
    timeout,
  });
  if (values.screenshot) await page.screenshot({ path: values.screenshot, fullPage: true });
  const result = await page.evaluate(() => ({
    state: document.getElementById("result").dataset.state,
    output: document.getElementById("output").textContent,
    details: document.getElementById("details").textContent,
    steps: Array.from(document.querySelectorAll("#steps li"), (li) => `${li.className}: ${li.textContent}`),
  }));
  console.log(JSON.stringify({ ...result, methods, errors }));
} catch (err) {
  console.log(JSON.stringify({ state: "error", output: String(err), methods, errors }));
} finally {
  await browser.close();
}
