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


#: Blocks a settlement must be buried under before it counts as confirmed, when an option does
#: not say (docs/deploy.md explains the choice). Ethereum: 12 blocks (~2.4 min; finality is ~2
#: epochs). OP-stack L2s (Base): a few sequencer blocks. Polygon PoS: deep enough for its past
#: reorgs. Avalanche: single-slot finality. anvil: a dev chain reorgs only when told to.
DEFAULT_CONFIRMATIONS: dict[int, int] = {
    1: 12,
    8453: 5,
    84532: 2,
    137: 32,
    80002: 8,
    43114: 1,
    43113: 1,
    31337: 1,
}
#: For a chain not listed above.
UNKNOWN_CHAIN_CONFIRMATIONS = 5


def default_confirmations(chain_id: int) -> int:
    return DEFAULT_CONFIRMATIONS.get(chain_id, UNKNOWN_CHAIN_CONFIRMATIONS)


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
