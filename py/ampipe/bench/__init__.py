"""Benchmarks. Speed is shown here, never in pass/fail tests (docs/model.md, "Block benchmark")."""
