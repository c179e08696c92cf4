// Compile contracts/*.sol with the npm solc package into contracts/build/<Name>.json
// ({abi, bytecode, deployedBytecode}: the runtime code is what anvil_setCode places).
// The build is committed: the service deploys from it, so no host needs Node to deploy, and
// tests/test_contracts.py compiles afresh into a temporary directory and compares.
// Usage: node contracts/compile.js [OUT_DIR]   (`make contracts` after editing a .sol file)
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const dir = __dirname;
const outDir = process.argv[2] ? path.resolve(process.argv[2]) : path.join(dir, "build");
fs.mkdirSync(outDir, { recursive: true });

for (const file of fs.readdirSync(dir).filter((f) => f.endsWith(".sol"))) {
  const name = path.basename(file, ".sol");
  const src = path.join(dir, file);
  const out = path.join(outDir, `${name}.json`);
  const input = {
    language: "Solidity",
    sources: { [file]: { content: fs.readFileSync(src, "utf8") } },
    settings: {
      optimizer: { enabled: true, runs: 200 },
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === "error");
  if (errors.length) {
    for (const e of errors) console.error(e.formattedMessage);
    process.exit(1);
  }
  const c = output.contracts[file][name];
  fs.writeFileSync(out, JSON.stringify(
      {
        abi: c.abi,
        bytecode: "0x" + c.evm.bytecode.object,
        deployedBytecode: "0x" + c.evm.deployedBytecode.object,
      },
      null,
      1,
    ),
  );
  console.log(`compiled ${file} -> ${path.relative(process.cwd(), out)}`);
}
