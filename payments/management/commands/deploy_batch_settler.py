"""Deploy the BatchSettler contract (contracts/BatchSettler.sol) to a payment option's chain.

It holds no funds and has no owner, so any account may deploy it; the first relayer lane pays
the gas by default. Put the address it prints in the option's ``batch_settler`` (in
``X402_PAYMENT_OPTIONS``) or in ``X402_BATCH_SETTLER``, on every process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from payments.chain import contracts
from payments.chain.relayer import lanes
from payments.options import configured


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--network", help="the option's CAIP-2 network (default: the first option)")
        parser.add_argument("--rpc-url", help="deploy through this node instead of the option's")
        parser.add_argument("--key-file", help="a file holding the deployer's private key (default: relayer lane 1)")

    def handle(self, *args: Any, **opts: Any) -> None:
        options = [c for c in configured() if not opts["network"] or c.option.network == opts["network"]]
        if not options and not opts["rpc_url"]:
            raise CommandError("no such payment option; give --network or --rpc-url")
        rpc_url = opts["rpc_url"] or options[0].rpc_url
        if opts["key_file"]:
            key = Path(opts["key_file"]).read_text().strip()
        else:
            try:
                key = lanes()[0].key.hex()
            except RuntimeError as exc:
                raise CommandError(str(exc)) from None
        address = contracts.deploy(rpc_url, "BatchSettler", private_key=key)
        self.stdout.write(self.style.SUCCESS(f"BatchSettler deployed at {address}"))
        if options:
            self.stdout.write(
                "add to the option in X402_PAYMENT_OPTIONS: "
                + json.dumps({"network": options[0].option.network, "batch_settler": address})
            )
        self.stdout.write(f"or, with a single option from X402_ASSET...: X402_BATCH_SETTLER={address}")
