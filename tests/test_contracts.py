"""The compiled contracts the service deploys from are shipped in the repository; a fresh
compile of the sources with the pinned npm solc must give exactly what is shipped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from web3 import Web3

from payments.chain import contracts

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_build_is_what_the_sources_compile_to(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is needed to compile the contracts (make test installs the npm packages)"
    subprocess.run(
        [node, str(ROOT / "contracts" / "compile.js"), str(tmp_path)], check=True, capture_output=True
    )
    sources = sorted(p.stem for p in (ROOT / "contracts").glob("*.sol"))
    shipped = sorted(p.stem for p in contracts.BUILD.glob("*.json"))
    assert shipped == sources
    for name in sources:
        fresh = json.loads((tmp_path / f"{name}.json").read_text())
        assert fresh == contracts.artifact(name), (
            f"contracts/build/{name}.json is stale: run `make contracts`"
        )


def test_deploy_batch_settler_needs_no_node(chain, tmp_path: Path) -> None:
    """The production command deploys from the shipped build with no Node on the PATH."""
    key = tmp_path / "key"
    key.write_text(chain.relayer_private_keys[0])
    env = {k: v for k, v in os.environ.items() if k != "PATH"} | {
        "PATH": str(tmp_path),
        "DJANGO_DEBUG": "true",
    }
    done = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "deploy_batch_settler",
            "--rpc-url",
            chain.rpc_url,
            "--key-file",
            str(key),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    address = done.stdout.split("BatchSettler deployed at ")[1].split()[0]
    code = Web3(Web3.HTTPProvider(chain.rpc_url)).eth.get_code(Web3.to_checksum_address(address))
    assert code.hex().removeprefix("0x") == contracts.artifact("BatchSettler")[
        "deployedBytecode"
    ].removeprefix("0x")
