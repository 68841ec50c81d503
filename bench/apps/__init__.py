"""Hooks the benchmark workloads run (``orch worker --app bench.apps.benchapp``)."""
