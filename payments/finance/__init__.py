"""Finance: ledger exports and export jobs, reports and charts, periods, reconciliation with the chain."""
