"""Chain reads that need no node: the answers are scripted."""

from __future__ import annotations

import pytest

from payments.chain import node as chain

MAGIC = "1626ba7e"


@pytest.mark.parametrize(
    "answer, approves",
    [
        ("0x" + MAGIC + "00" * 28, True),
        # The magic value followed by anything but zeros is not EIP-1271's "valid" (a contract
        # that returns garbage, or a fallback that echoes its calldata, must not pass).
        ("0x" + MAGIC + "ff" * 28, False),
        ("0x" + MAGIC, False),
        ("0x" + MAGIC + "00" * 60, False),
        ("0x" + "00" * 32, False),
    ],
)
def test_eip1271_magic_value_is_compared_as_a_whole_word(monkeypatch, answer, approves) -> None:
    def batch(url, calls, timeout=None, **kw):
        return ["0x" + "00" * 31 + "ff", "0x" + "00" * 32, "0x10", "0x6080"]  # balance, state, head, code

    monkeypatch.setattr(chain, "rpc_batch", batch)
    monkeypatch.setattr(chain, "rpc", lambda url, method, params, timeout=None: answer)
    state = chain.payer_state("http://node", "0x" + "11" * 20, b"\x22" * 20, b"\x33" * 32, (b"\x44" * 32, b"sig"))
    assert state.contract_approves is approves
    assert state.block == 16
