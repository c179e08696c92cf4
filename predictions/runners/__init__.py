"""Runners execute predictions: ``python`` (a Cog-style predictor class loaded in the worker)
and ``cog`` (a Cog model server over HTTP, reporting back through a webhook)."""
