"""The benchmark harness keeps working: its quick mode runs end to end (timings not asserted).

CI runs this as a stage of its own (``make bench-smoke``), not in the suite: its saturating
loads would slow every test running beside it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.bench
@pytest.mark.timeout(600)  # both servers, settlement, the sustained run: ~1.5 min idle, ~3 loaded
def test_quick_benchmark_runs_and_reports() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=570,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((ROOT / "benchmarks" / "results" / "quick.json").read_text())
    for paid in (results["paid"], results["wsgi"]["paid"]):  # statuses: what the non-2xx were
        assert paid["requests"] > 0 and paid["non_2xx"] == 0, paid
    assert results["reference_paid"]["non_2xx"] == 0
    assert results["chain_read"]["cpu_ms"] > 0 and results["chain_read"]["wall_ms"] > 0
    assert results["settlement"]["confirmed"] == results["settlement"]["payments"]
    batched, sustained = results["settlement"]["batched"], results["sustained"]
    assert batched["confirmed"] == batched["payments"] and batched["transactions"] < batched["payments"]
    assert sustained["expired_or_failed"] == 0 and sustained["ledger_equals_chain"]
    channels = results["channels"]
    assert channels["paid"]["requests"] > 0 and channels["paid"]["non_2xx"] == 0
    assert channels["paid_half_rate"]["ok"] == channels["paid_half_rate"]["requests"]
    gas = channels["gas"]
    assert gas["deposit"] > 0 and gas["claim"] > 0 and gas["settle"] > 0 and gas["refund"] > 0
    # A hundred requests on a channel cost less gas each than one exact payment settled in a batch.
    assert gas["per_request"]["1000"] < gas["per_request"]["100"] < gas["exact_batched_per_payment"]
    assert (ROOT / "benchmarks" / "results" / "quick.sustained.png").exists()
    assert "paid / ungated" in done.stdout
