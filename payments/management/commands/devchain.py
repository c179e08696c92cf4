"""Start the local dev chain, deploy the test USDC, fund demo payers, write var/devchain.json."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand

from payments.chain import devchain
from x402site.conf import x402


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--port", type=int, default=8545)
        parser.add_argument("--output", default=str(x402.chain.devchain_file))
        parser.add_argument("--asset-name", default="USD Coin")
        parser.add_argument("--asset-version", default="2")

    def handle(self, *args: Any, **opts: Any) -> None:
        out = Path(opts["output"])
        log = out.parent / "anvil.log"
        out.parent.mkdir(parents=True, exist_ok=True)
        proc, config = devchain.start_anvil(opts["port"], log_path=log)
        try:
            chain = devchain.deploy(
                f"http://127.0.0.1:{opts['port']}",
                config,
                asset_name=opts["asset_name"],
                asset_version=opts["asset_version"],
            )
            chain.write(out)
            self.stdout.write(f"anvil on {chain.rpc_url} (log {log}); test USDC at {chain.asset}")
            self.stdout.write(f"wrote {out}; Ctrl-C stops the chain")
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
            while proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            devchain.stop(proc)
