"""Compare the ledger with the token's Transfer events to our pay-to address over a block range.

Lists what is on chain but not in the ledger, and what the ledger counts as paid but the chain
does not show; exits non-zero when they differ.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from payments.chain.abi import TRANSFER_TOPIC
from payments.chain.node import rpc
from payments.models import Payment, PaymentStatus
from payments.options import configured

#: Blocks per eth_getLogs call (public nodes cap the range).
CHUNK = 5_000


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--from-block", type=int, default=0)
        parser.add_argument("--to-block", type=int, help="default: the latest block")
        parser.add_argument("--network", help="CAIP-2 network; default: every configured option")

    def handle(self, *args: Any, **opts: Any) -> None:
        differences = 0
        for conf in configured():
            option = conf.option
            if opts["network"] and option.network != opts["network"]:
                continue
            last = (
                opts["to_block"]
                if opts["to_block"] is not None
                else int(rpc(conf.rpc_url, "eth_blockNumber", []), 16)
            )
            first = opts["from_block"]
            on_chain: dict[str, int] = {}  # per transaction
            transfers = 0
            topic_to = "0x" + option.pay_to[2:].lower().rjust(64, "0")
            for start in range(first, last + 1, CHUNK):
                logs = rpc(
                    conf.rpc_url,
                    "eth_getLogs",
                    [
                        {
                            "address": option.asset,
                            "fromBlock": hex(start),
                            "toBlock": hex(min(last, start + CHUNK - 1)),
                            "topics": [TRANSFER_TOPIC, None, topic_to],
                        }
                    ],
                )
                transfers += len(logs)
                for log in logs:
                    on_chain[log["transactionHash"].lower()] = on_chain.get(
                        log["transactionHash"].lower(), 0
                    ) + int(log["data"], 16)
            paid = Payment.objects.filter(
                network=option.network,
                asset=option.asset,
                pay_to=option.pay_to,
                status__in=[PaymentStatus.SETTLED, PaymentStatus.CONFIRMED],
                block_number__gte=first,
                block_number__lte=last,
            )
            in_ledger: dict[str, int] = {}  # per transaction: a batch settles many payments
            payments = 0
            for p in paid:
                in_ledger[p.settle_tx_hash.lower()] = in_ledger.get(p.settle_tx_hash.lower(), 0) + int(p.amount)
                payments += 1
            chain_only = sorted(set(on_chain) - set(in_ledger))
            ledger_only = sorted(h for h in in_ledger if on_chain.get(h) != in_ledger[h])
            scale = Decimal(10) ** option.decimals
            self.stdout.write(
                f"{option.network} {option.symbol} {option.asset} -> {option.pay_to}, blocks {first}-{last}\n"
                f"  on chain: {transfers} transfers, {Decimal(sum(on_chain.values())) / scale} {option.symbol}\n"
                f"  in ledger (settled or confirmed): {payments} payments, "
                f"{Decimal(sum(in_ledger.values())) / scale} {option.symbol}"
            )
            for h in chain_only:
                self.stdout.write(f"  on chain, not in the ledger: {h} ({Decimal(on_chain[h]) / scale})")
            for h in ledger_only:
                self.stdout.write(f"  in the ledger, not on chain (or another amount): {h}")
            differences += len(chain_only) + len(ledger_only)
        if differences:
            raise CommandError(f"{differences} differences between the ledger and the chain")
        self.stdout.write("the ledger and the chain agree")
