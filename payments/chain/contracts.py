"""Our compiled contracts, shipped in the repository (``contracts/build/<Name>.json``: abi,
bytecode, runtime code), and their deployment.

Production deploys from these files (``manage.py deploy_batch_settler``), so a host needs
neither Node nor the npm compiler; ``make contracts`` rebuilds them after a source changes and
``tests/test_contracts.py`` checks that a fresh compile gives exactly what is shipped.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

BUILD = Path(__file__).resolve().parents[2] / "contracts" / "build"


@cache
def artifact(name: str) -> dict[str, Any]:
    """``contracts/build/<name>.json``: ``{abi, bytecode, deployedBytecode}``."""
    path = BUILD / f"{name}.json"
    if not path.exists():
        raise RuntimeError(f"contracts/build/{name}.json is missing: run `make contracts`")
    return json.loads(path.read_text())


def deploy(rpc_url: str, name: str, *args: Any, private_key: str = "", sender: str = "") -> str:
    """Deploy contract ``name`` with constructor ``args``; its address. ``private_key`` signs
    (a real network), else ``sender`` must be an account the node unlocks (anvil's)."""
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(rpc_url))
    build = artifact(name)
    factory = w3.eth.contract(abi=build["abi"], bytecode=build["bytecode"])
    if private_key:
        from eth_account import Account

        account = Account.from_key(private_key)
        tx = factory.constructor(*args).build_transaction(
            {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address, "pending")}
        )
        tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    else:
        tx_hash = factory.constructor(*args).transact({"from": sender})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=180)
    if receipt["status"] != 1:
        raise RuntimeError(f"deploying {name} reverted ({tx_hash.hex()})")
    return receipt["contractAddress"]
