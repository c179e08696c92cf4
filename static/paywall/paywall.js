// The paywall page: an input form from the model's JSON Schema, and x402 payment with the
// visitor's own wallet (any EIP-1193 provider: an extension's window.ethereum, or one announced
// through EIP-6963). The flow is the x402 `exact` EVM scheme that agents follow:
//   1. POST the input unpaid: the 402's PAYMENT-REQUIRED header is the requirement for exactly
//      this input (its price, pay-to, and maxTimeoutSeconds, longer for held payments);
//   2. switch the wallet to the requirement's chain (wallet_switchEthereumChain);
//   3. sign the EIP-3009 TransferWithAuthorization with eth_signTypedData_v4;
//   4. POST again with the payment in PAYMENT-SIGNATURE, then poll the prediction's urls.get.
// Everything is served by this site: no CDN, no third-party RPC (reads go through the wallet).
(() => {
  "use strict";

  const data = (id) => JSON.parse(document.getElementById(id).textContent);
  const required = data("x402-payment-required");
  const schema = data("x402-input-schema") || {};
  const example = data("x402-example-input") || {};
  const decimals = data("x402-asset-decimals") || {};
  const requestFields = data("x402-request-fields") || {}; // e.g. the version for /v1/predictions
  const endpoint = new URL(required.resource.url).pathname;
  const $ = (id) => document.getElementById(id);
  const TERMINAL = ["succeeded", "failed", "canceled"];
  const AUTHORIZATION_TYPES = [
    { name: "from", type: "address" },
    { name: "to", type: "address" },
    { name: "value", type: "uint256" },
    { name: "validAfter", type: "uint256" },
    { name: "validBefore", type: "uint256" },
    { name: "nonce", type: "bytes32" },
  ];

  // --- the input form, generated from the JSON Schema -----------------------------------------

  const properties = schema.properties || {};
  const requiredFields = new Set(schema.required || []);
  const fields = $("fields");

  function initialValue(name, spec) {
    if ("default" in spec) return spec.default;
    if (Array.isArray(spec.examples) && spec.examples.length) return spec.examples[0];
    return example[name];
  }

  function control(name, spec) {
    const value = initialValue(name, spec);
    let el;
    if (Array.isArray(spec.enum)) {
      el = document.createElement("select");
      for (const option of spec.enum) {
        const opt = document.createElement("option");
        opt.value = JSON.stringify(option);
        opt.textContent = String(option);
        opt.selected = option === value;
        el.append(opt);
      }
      el.dataset.kind = "enum";
    } else if (spec.type === "boolean") {
      el = document.createElement("input");
      el.type = "checkbox";
      el.checked = Boolean(value);
      el.dataset.kind = "boolean";
    } else if (spec.type === "integer" || spec.type === "number") {
      el = document.createElement("input");
      el.type = "number";
      el.step = spec.type === "integer" ? "1" : "any";
      if ("minimum" in spec) el.min = spec.minimum;
      if ("maximum" in spec) el.max = spec.maximum;
      if (value !== undefined) el.value = value;
      el.dataset.kind = spec.type;
    } else if (spec.type === "string") {
      const short = spec.format || (spec.maxLength && spec.maxLength <= 120);
      el = document.createElement(short ? "input" : "textarea");
      if (short) el.type = "text";
      if (spec.maxLength) el.maxLength = spec.maxLength;
      if (value !== undefined) el.value = value;
      el.dataset.kind = "string";
    } else {
      el = document.createElement("textarea");
      el.value = value === undefined ? "" : JSON.stringify(value, null, 2);
      el.dataset.kind = "json";
    }
    el.id = `input-${name}`;
    el.name = name;
    return el;
  }

  function addField(name, spec) {
    const wrap = document.createElement("div");
    wrap.className = "field";
    const label = document.createElement("label");
    const input = control(name, spec);
    label.htmlFor = input.id;
    label.textContent = (spec.title || name) + (requiredFields.has(name) ? " *" : "");
    wrap.append(label, input);
    if (spec.description) {
      const help = document.createElement("span");
      help.className = "help";
      help.textContent = spec.description;
      wrap.append(help);
    }
    const problem = document.createElement("span");
    problem.className = "problem";
    problem.id = `problem-${name}`;
    wrap.append(problem);
    fields.append(wrap);
  }

  const names = Object.keys(properties);
  if (names.length) {
    names.forEach((name) => addField(name, properties[name]));
  } else {
    addField("input", { type: "object", title: "input (JSON)", default: example });
  }

  function readInput() {
    const input = {};
    for (const el of fields.querySelectorAll("[name]")) {
      const kind = el.dataset.kind;
      if (kind === "boolean") input[el.name] = el.checked;
      else if (kind === "enum") input[el.name] = JSON.parse(el.value);
      else if (el.value === "" && !requiredFields.has(el.name)) continue;
      else if (kind === "integer") input[el.name] = Number.parseInt(el.value, 10);
      else if (kind === "number") input[el.name] = Number(el.value);
      else if (kind === "json") {
        try {
          input[el.name] = JSON.parse(el.value);
        } catch {
          throw new InputError({ [el.name]: "not valid JSON" });
        }
      } else input[el.name] = el.value;
    }
    return names.length ? input : input.input;
  }

  class InputError extends Error {
    constructor(fields) {
      super("Some inputs need fixing.");
      this.fields = fields;
    }
  }

  function showProblems(problems) {
    for (const el of fields.querySelectorAll(".problem")) el.textContent = "";
    for (const [name, message] of Object.entries(problems || {})) {
      const el = $(`problem-${name.split(".")[0]}`);
      if (el) el.textContent = message;
    }
  }

  // --- progress ---------------------------------------------------------------------------------

  let current = null;
  function step(text) {
    if (current) current.className = "done";
    current = document.createElement("li");
    current.textContent = text;
    $("steps").append(current);
    $("progress").hidden = false;
  }
  function fail(text) {
    if (!current) step("");
    current.className = "failed";
    current.textContent = text;
    current = null;
  }
  function finish(text) {
    step(text);
    current.className = "done";
    current = null;
  }

  // --- the wallet (EIP-1193) ------------------------------------------------------------------

  let provider = window.ethereum || null;
  let account = null;
  window.addEventListener("eip6963:announceProvider", (event) => {
    provider = provider || event.detail.provider;
    $("connect").disabled = false;
  });
  window.dispatchEvent(new Event("eip6963:requestProvider"));

  function showAccount(accounts) {
    account = accounts && accounts.length ? accounts[0] : null;
    $("wallet").hidden = !account;
    $("wallet").textContent = account ? `Paying from ${account}` : "";
    $("pay").disabled = !account;
    $("connect").textContent = account ? "Wallet connected" : "Connect wallet";
  }

  async function connect() {
    if (!provider) throw new Error("No wallet found: install a browser wallet (EIP-1193) and reload.");
    showAccount(await provider.request({ method: "eth_requestAccounts" }));
    if (provider.on) provider.on("accountsChanged", showAccount);
    if (!account) throw new Error("The wallet shared no account.");
  }

  const chainOf = (network) => Number.parseInt(network.split(":")[1], 10);
  const hex = (n) => "0x" + BigInt(n).toString(16);

  async function useChain(chainId) {
    const currentChain = Number.parseInt(await provider.request({ method: "eth_chainId" }), 16);
    if (currentChain === chainId) return;
    try {
      await provider.request({ method: "wallet_switchEthereumChain", params: [{ chainId: hex(chainId) }] });
    } catch (err) {
      if (err && err.code === 4902) throw new Error(`Add the chain ${chainId} to your wallet, then pay again.`);
      throw err;
    }
  }

  async function balanceOf(asset, owner) {
    const data = "0x70a08231" + owner.slice(2).toLowerCase().padStart(64, "0");
    return BigInt(await provider.request({ method: "eth_call", params: [{ to: asset, data }, "latest"] }));
  }

  function randomNonce() {
    const bytes = crypto.getRandomValues(new Uint8Array(32));
    return "0x" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function base64Json(value) {
    const bytes = new TextEncoder().encode(JSON.stringify(value));
    let text = "";
    for (const b of bytes) text += String.fromCharCode(b);
    return btoa(text);
  }

  function decodeBase64Json(text) {
    const binary = atob(text);
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
  }

  // x402 v2 `exact` on EVM: an EIP-3009 authorization for exactly the requirement's amount, valid
  // from 10 minutes ago (clock skew) until maxTimeoutSeconds from now, with a random nonce.
  async function signPayment(requirement, paymentRequired) {
    const chainId = chainOf(requirement.network);
    const now = Math.floor(Date.now() / 1000);
    const authorization = {
      from: account,
      to: requirement.payTo,
      value: String(requirement.amount),
      validAfter: String(now - 600),
      validBefore: String(now + requirement.maxTimeoutSeconds),
      nonce: randomNonce(),
    };
    const typedData = {
      types: {
        EIP712Domain: [
          { name: "name", type: "string" },
          { name: "version", type: "string" },
          { name: "chainId", type: "uint256" },
          { name: "verifyingContract", type: "address" },
        ],
        TransferWithAuthorization: AUTHORIZATION_TYPES,
      },
      primaryType: "TransferWithAuthorization",
      domain: {
        name: requirement.extra.name,
        version: requirement.extra.version,
        chainId,
        verifyingContract: requirement.asset,
      },
      message: authorization,
    };
    const signature = await provider.request({
      method: "eth_signTypedData_v4",
      params: [account, JSON.stringify(typedData)],
    });
    return base64Json({
      x402Version: 2,
      accepted: requirement,
      resource: paymentRequired.resource,
      payload: { signature, authorization },
    });
  }

  // --- the API ----------------------------------------------------------------------------------

  async function post(input, paymentHeader) {
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    if (paymentHeader) headers["PAYMENT-SIGNATURE"] = paymentHeader;
    return fetch(endpoint, { method: "POST", headers, body: JSON.stringify({ ...requestFields, input }) });
  }

  async function problem(response) {
    const body = await response.json().catch(() => ({}));
    if (body.invalid_fields) showProblems(body.invalid_fields);
    const reason = body.message || body.error || body.detail || response.statusText;
    return new Error(`${response.status}: ${reason}`);
  }

  function pick(paymentRequired) {
    const offered = paymentRequired.accepts.filter((r) => r.scheme === "exact" && r.network.startsWith("eip155:"));
    if (!offered.length) throw new Error("This server offers no EVM payment option.");
    return offered[0];
  }

  // An atomic amount of `asset` in whole tokens, e.g. 10000 -> "0.01" for USDC (6 decimals).
  const formatUnits = (atomic, asset) => {
    const places = decimals[asset] ?? 6;
    const s = BigInt(atomic).toString().padStart(places + 1, "0");
    const whole = s.slice(0, s.length - places);
    const fraction = s.slice(s.length - places).replace(/0+$/, "");
    return fraction ? `${whole}.${fraction}` : whole;
  };

  function render(prediction) {
    const result = $("result");
    result.dataset.state = prediction.status;
    const out = prediction.output;
    $("output").textContent =
      prediction.status === "succeeded"
        ? typeof out === "string" ? out : JSON.stringify(out, null, 2)
        : prediction.error || prediction.status;
    const payment = prediction.payment || {};
    const parts = [`prediction ${prediction.id}`, `status ${prediction.status}`];
    if (payment.status) parts.push(`payment ${payment.status}`);
    if (payment.transaction) parts.push(`transaction ${payment.transaction}`);
    $("details").textContent = parts.join(" · ");
  }

  async function follow(prediction) {
    step(`Prediction ${prediction.id}: ${prediction.status}`);
    let delay = 400;
    while (!TERMINAL.includes(prediction.status)) {
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 1.5, 2000);
      const response = await fetch(prediction.urls.get, { headers: { Accept: "application/json" } });
      if (!response.ok) throw await problem(response);
      prediction = await response.json();
      current.textContent = `Prediction ${prediction.id}: ${prediction.status}`;
      render(prediction);
    }
    render(prediction);
    if (prediction.status === "succeeded") finish("Done");
    else fail(`The prediction ${prediction.status}: ${prediction.error || "no output"}`);
  }

  async function pay(event) {
    event.preventDefault();
    $("pay").disabled = true;
    $("steps").replaceChildren();
    $("result").dataset.state = "";
    current = null;
    try {
      showProblems({});
      const input = readInput();
      if (!account) await connect();
      step("Pricing this input");
      const unpaid = await post(input, null);
      if (unpaid.status === 201 || unpaid.status === 200) return await follow(await unpaid.json());
      if (unpaid.status !== 402 || !unpaid.headers.get("PAYMENT-REQUIRED")) throw await problem(unpaid);
      const paymentRequired = decodeBase64Json(unpaid.headers.get("PAYMENT-REQUIRED"));
      const requirement = pick(paymentRequired);
      $("price").textContent = `${formatUnits(requirement.amount, requirement.asset)} USDC`;
      step(`Switching the wallet to chain ${chainOf(requirement.network)}`);
      await useChain(chainOf(requirement.network));
      step("Checking your balance");
      const balance = await balanceOf(requirement.asset, account);
      if (balance < BigInt(requirement.amount)) {
        throw new Error(
          `Your balance (${formatUnits(balance, requirement.asset)} ${requirement.extra.name}) does not cover ` +
            `${formatUnits(requirement.amount, requirement.asset)}.`,
        );
      }
      step(`Sign the payment of ${formatUnits(requirement.amount, requirement.asset)} ${requirement.extra.name} in your wallet`);
      const header = await signPayment(requirement, paymentRequired);
      step("Submitting the payment");
      const paid = await post(input, header);
      if (paid.status !== 201 && paid.status !== 200) throw await problem(paid);
      await follow(await paid.json());
    } catch (err) {
      if (err instanceof InputError) showProblems(err.fields);
      fail(err && err.message ? err.message : String(err));
    } finally {
      $("pay").disabled = !account;
    }
  }

  $("connect").disabled = false;
  $("connect").addEventListener("click", () =>
    connect().catch((err) => {
      fail(err.message || String(err));
    }),
  );
  $("run").addEventListener("submit", pay);
})();
