"""On chain: the node client, relayer lanes, settlement, batching, contracts, the dev chain."""
