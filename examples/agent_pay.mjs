#!/usr/bin/env node
// An agent in JavaScript buys one prediction with the official @x402/fetch client.
//
//   node examples/agent_pay.mjs "hello"                       # against the quick start
//   node examples/agent_pay.mjs --base-url URL --devchain FILE --payer 1 "text"
//   node examples/agent_pay.mjs --no-wait "text"   # answer at once: PAYMENT-RESPONSE is settlement_pending
//
// By default the request says `Prefer: wait`: the answer comes once the prediction is done, and
// its PAYMENT-RESPONSE carries the settlement transaction's hash.
// Prints the prediction's status, output and settlement transaction, then one JSON line.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { wrapFetchWithPaymentFromConfig, decodePaymentResponseHeader } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm";
import { privateKeyToAccount } from "viem/accounts";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    "base-url": { type: "string", default: "http://127.0.0.1:8000" },
    devchain: { type: "string", default: new URL("../var/devchain.json", import.meta.url).pathname },
    payer: { type: "string", default: "0" },
    model: { type: "string", default: "demo/echo-text" },
    "max-atomic": { type: "string", default: "1000000" },
    "no-wait": { type: "boolean", default: false },
  },
});
const chain = JSON.parse(readFileSync(values.devchain, "utf8"));
const account = privateKeyToAccount(chain.payers[Number(values.payer)].private_key);

const fetchWithPayment = wrapFetchWithPaymentFromConfig(fetch, {
  schemes: [{ network: "eip155:*", client: new ExactEvmScheme(account) }],
  // The dev chain's test USDC is not a token the client knows: allow it, capped.
  spendControls: {
    allowedAssets: [{ network: chain.network, asset: chain.asset, maxAmountPerPayment: values["max-atomic"] }],
  },
});

const url = `${values["base-url"]}/v1/models/${values.model}/predictions`;
const response = await fetchWithPayment(url, {
  method: "POST",
  headers: { "Content-Type": "application/json", ...(values["no-wait"] ? {} : { Prefer: "wait" }) },
  body: JSON.stringify({ input: { text: positionals[0] ?? "hello from a JavaScript agent" } }),
});
console.log(`POST ${url} as ${account.address} -> HTTP ${response.status}`);
if (response.status !== 201 && response.status !== 200) {
  console.log(await response.text());
  process.exit(1);
}
const settle = response.headers.get("PAYMENT-RESPONSE");
let prediction = await response.json();
const deadline = Date.now() + 60_000;
while (!["succeeded", "failed", "canceled"].includes(prediction.status) && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 250));
  prediction = await (await fetch(prediction.urls.get)).json();
}
console.log(`status      ${prediction.status}`);
console.log(`output      ${JSON.stringify(prediction.output)}`);
console.log(`transaction ${prediction.payment.transaction}`);
console.log(JSON.stringify({ id: prediction.id, status: prediction.status, output: prediction.output,
  transaction: prediction.payment.transaction, paymentResponse: settle ? decodePaymentResponseHeader(settle) : null }));
process.exit(prediction.status === "succeeded" ? 0 : 1);
