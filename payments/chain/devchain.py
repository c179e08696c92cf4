"""The local development chain: anvil from npm, the test USDC token, funded demo wallets, and
Permit2 and the x402 upto proxy at their canonical addresses (for the ``upto`` scheme).

Used by ``manage.py devchain``, the quick start and the test suite. Development only: nothing
here runs in production.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from payments.chain import contracts

BASE_DIR = Path(__file__).resolve().parents[2]
ANVIL = BASE_DIR / "node_modules" / ".bin" / "anvil"
CHAIN_ID = 31337
#: USDC (6 decimals) minted to every demo payer.
PAYER_FUNDS = 1_000 * 10**6
#: USDC minted to the refund wallet.
REFUND_FUNDS = 10_000 * 10**6
UINT256_MAX = 2**256 - 1


@dataclass
class DevChain:
    """What ``var/devchain.json`` holds; its keys are a fixed point other tools rely on."""

    rpc_url: str
    chain_id: int
    network: str
    asset: str
    asset_name: str
    asset_version: str
    pay_to: str
    payers: list[dict[str, str]] = field(default_factory=list)
    relayer_address: str = ""
    relayer_private_key: str = ""
    #: Every relayer lane's key (the first is ``relayer_private_key``).
    relayer_private_keys: list[str] = field(default_factory=list)
    #: Our BatchSettler contract (batched settlement), if deployed.
    batch_settler: str = ""
    #: Permit2 and the x402 upto proxy (the canonical addresses), when placed.
    permit2: str = ""
    upto_proxy: str = ""
    #: The refund wallet (X402_REFUND_KEY): gas money and test USDC to send refunds with.
    refund_address: str = ""
    refund_private_key: str = ""
    #: Our ``batch-settlement`` receiverAuthorizer (X402_CHANNEL_AUTHORIZER_KEY): signs claims and
    #: refunds, sends nothing. The settlement contract is placed at its canonical address.
    channel_authorizer_private_key: str = ""

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> DevChain:
        return cls(**json.loads(path.read_text()))


def set_code(rpc_url: str, name: str, address: str) -> None:
    """Make ``address`` run our compiled contract ``name`` (its runtime code, ``anvil_setCode``)."""
    code = contracts.artifact(name)["deployedBytecode"]
    r = requests.post(
        rpc_url,
        json={"jsonrpc": "2.0", "id": 1, "method": "anvil_setCode", "params": [address, code]},
        timeout=10,
    )
    if "error" in r.json():
        raise RuntimeError(f"anvil_setCode {name}: {r.json()['error']}")


def place_upto_contracts(rpc_url: str) -> tuple[str, str]:
    """Put our Permit2 and x402 upto proxy (contracts/Permit2.sol, X402UptoPermit2Proxy.sol) at
    the canonical addresses the x402 SDK signs for, with ``anvil_setCode``: their runtime code
    needs no constructor state (see the contracts). (Permit2, proxy) addresses."""
    from payments.x402.permit2 import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS

    set_code(rpc_url, "Permit2", PERMIT2_ADDRESS)
    set_code(rpc_url, "X402UptoPermit2Proxy", UPTO_PROXY_ADDRESS)
    return PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS


def place_batch_settlement_contracts(rpc_url: str) -> tuple[str, str]:
    """Put our x402 batch-settlement contract and its EIP-3009 deposit collector
    (contracts/X402BatchSettlement.sol, X402ERC3009DepositCollector.sol) at the canonical
    addresses the x402 SDK's ``batch-settlement`` client signs for, with ``anvil_setCode``
    (their runtime code needs no constructor state). (Settlement, collector) addresses."""
    from payments.x402.batch_settlement import BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS

    set_code(rpc_url, "X402BatchSettlement", BATCH_SETTLEMENT_ADDRESS)
    set_code(rpc_url, "X402ERC3009DepositCollector", ERC3009_DEPOSIT_COLLECTOR_ADDRESS)
    return BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS


def approve_permit2(rpc_url: str, asset: str, payer: str) -> None:
    """``payer`` (an account the node unlocks) lets Permit2 move its ``asset`` (once, unlimited)."""
    from web3 import Web3

    from payments.x402.permit2 import PERMIT2_ADDRESS

    w3 = Web3(Web3.HTTPProvider(rpc_url))
    token = w3.eth.contract(address=Web3.to_checksum_address(asset), abi=contracts.artifact("TestUSDC")["abi"])
    tx = token.functions.approve(PERMIT2_ADDRESS, UINT256_MAX).transact({"from": Web3.to_checksum_address(payer)})
    if w3.eth.wait_for_transaction_receipt(tx)["status"] != 1:
        raise RuntimeError(f"approve(Permit2) by {payer} reverted")


def wait_for_rpc(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = requests.post(
                url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}, timeout=1
            )
            if r.ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no JSON-RPC answer at {url} after {timeout}s")
        time.sleep(0.05)


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Wait until something answers HTTP at ``url`` (any status)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers at {url} after {timeout}s") from None
            time.sleep(0.1)


def start_anvil(
    port: int,
    *,
    host: str = "127.0.0.1",
    accounts: int = 10,
    extra_args: list[str] | None = None,
    log_path: Path | None = None,
) -> tuple[subprocess.Popen, dict]:
    """Start anvil and return the process and its config (accounts and private keys)."""
    if not ANVIL.exists():
        raise RuntimeError(f"{ANVIL} is missing: run `npm ci` (or `make setup`)")
    config_out = Path(tempfile.mkstemp(prefix="anvil-", suffix=".json")[1])
    config_out.unlink()
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [
            str(ANVIL),
            "--host",
            host,
            "--port",
            str(port),
            "--chain-id",
            str(CHAIN_ID),
            "--accounts",
            str(accounts),
            "--config-out",
            str(config_out),
            *(extra_args or []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_rpc(f"http://{host}:{port}")
        deadline = time.monotonic() + 5
        while not config_out.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        config = json.loads(config_out.read_text())
    except Exception:
        proc.kill()
        raise
    finally:
        config_out.unlink(missing_ok=True)
    return proc, config


def deploy(
    rpc_url: str,
    config: dict[str, Any],
    *,
    asset_name: str = "USD Coin",
    asset_version: str = "2",
    payer_funds: int = PAYER_FUNDS,
    payer_count: int = 8,
    extra_relayers: int = 0,
) -> DevChain:
    """Deploy the test token and the BatchSettler, place Permit2 and the upto proxy, fund the
    payers and have them approve Permit2; account 0 deploys and relays, 1 is paid, the
    ``extra_relayers`` accounts after the payers are more relayer lanes; a new account, given
    gas money and USDC, is the refund wallet."""
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(rpc_url))
    addresses = [Web3.to_checksum_address(a) for a in config["available_accounts"]]
    keys = config["private_keys"]
    deployer, pay_to = addresses[0], addresses[1]
    build = contracts.artifact("TestUSDC")
    factory = w3.eth.contract(abi=build["abi"], bytecode=build["bytecode"])
    tx = factory.constructor(asset_name, asset_version).transact({"from": deployer})
    asset = w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
    token = w3.eth.contract(address=asset, abi=build["abi"])
    permit2, upto_proxy = place_upto_contracts(rpc_url)
    place_batch_settlement_contracts(rpc_url)
    payers = []
    for address, key in zip(addresses[2 : 2 + payer_count], keys[2 : 2 + payer_count], strict=True):
        w3.eth.wait_for_transaction_receipt(
            token.functions.mint(address, payer_funds).transact({"from": deployer})
        )
        approve_permit2(rpc_url, asset, address)
        payers.append({"address": address, "private_key": key})
    lanes = keys[2 + payer_count : 2 + payer_count + extra_relayers]
    from eth_account import Account

    refunds = Account.create()
    w3.provider.make_request("anvil_setBalance", [refunds.address, hex(10**19)])
    w3.eth.wait_for_transaction_receipt(token.functions.mint(refunds.address, REFUND_FUNDS).transact({"from": deployer}))
    return DevChain(
        rpc_url=rpc_url,
        chain_id=CHAIN_ID,
        network=f"eip155:{CHAIN_ID}",
        asset=asset,
        asset_name=asset_name,
        asset_version=asset_version,
        pay_to=pay_to,
        payers=payers,
        relayer_address=deployer,
        relayer_private_key=keys[0],
        relayer_private_keys=[keys[0], *lanes],
        batch_settler=contracts.deploy(rpc_url, "BatchSettler", sender=deployer),
        permit2=permit2,
        upto_proxy=upto_proxy,
        refund_address=refunds.address,
        refund_private_key="0x" + refunds.key.hex().removeprefix("0x"),
        channel_authorizer_private_key="0x" + Account.create().key.hex().removeprefix("0x"),
    )


def die_with_parent() -> None:
    """``preexec_fn`` for a helper process (a test's or a benchmark's worker or server): the
    kernel kills it when the thread that started it ends, so a suite or benchmark killed
    mid-run leaves no worker behind to settle payments in the next run's database (Linux;
    elsewhere nothing happens)."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
