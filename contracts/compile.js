// Compile contracts/*.sol with the npm solc package into contracts/build/<Name>.json
// ({abi, bytecode, deployedBytecode}: the runtime code is what anvil_setCode places).
// Usage: node contracts/compile.js   (skips the work when the build is newer than the source)
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const dir = __dirname;
const outDir = path.join(dir, "build");
fs.mkdirSync(outDir, { recursive: true });

for (const file of fs.readdirSync(dir).filter((f) => f.endsWith(".sol"))) {
  const name = path.basename(file, ".sol");
  const src = path.join(dir, file);
  const out = path.join(outDir, `${name}.json`);
  const fresh = (f) => fs.statSync(out).mtimeMs >= fs.statSync(f).mtimeMs;
  if (fs.existsSync(out) && fresh(src) && fresh(__filename)) continue;
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
