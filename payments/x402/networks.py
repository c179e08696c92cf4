"""Network names: CAIP-2 (x402 v2) and the v1 names the official clients know."""

from __future__ import annotations

#: v1 network names of the EVM chains we may be configured for, by chain id.
V1_NAMES: dict[int, str] = {
    1: "ethereum",
    8453: "base",
    84532: "base-sepolia",
    137: "polygon",
    80002: "polygon-amoy",
    43114: "avalanche",
    43113: "avalanche-fuji",
    31337: "anvil",
}


def caip2(chain_id: int) -> str:
    return f"eip155:{chain_id}"


def chain_id_of(network: str) -> int:
    """Chain id of a CAIP-2 ``eip155:<id>`` name; ValueError for anything else."""
    namespace, _, reference = network.partition(":")
    if namespace != "eip155" or not reference.isdigit() or len(reference) > 20:
        raise ValueError(f"not an eip155 network: {network!r}")
    return int(reference)


def v1_name(chain_id: int) -> str:
    return V1_NAMES.get(chain_id, f"eip155-{chain_id}")
