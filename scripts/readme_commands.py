#!/usr/bin/env python3
"""Run every shell block of the README (```sh fences) as printed, in the checkout's root.

CI runs this against a live quick start (scripts/quickstart_smoke.sh): each command a newcomer
copies from the README must work there as written. ``make run`` (already running) and
``make test`` (CI's next stage) are the only blocks skipped. Standard library only.

    python3 scripts/readme_commands.py [--list]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Blocks run by CI itself rather than from here.
SKIP = {"make run", "make test"}
FENCE = re.compile(r"^```sh\n(.*?)^```", re.S | re.M)


def blocks(readme: Path) -> list[str]:
    return [b.strip() for b in FENCE.findall(readme.read_text()) if b.strip() not in SKIP]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="print the blocks, run nothing")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    failed = 0
    for block in blocks(ROOT / "README.md"):
        print(f"--- README block:\n{block}", flush=True)
        if args.list:
            continue
        started = time.monotonic()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, timeout=args.timeout)
        print(f"--- exit {done.returncode} after {time.monotonic() - started:.1f}s", flush=True)
        failed += done.returncode != 0
    print(f"README blocks: {failed} failed" if failed else "README blocks: all ran", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
