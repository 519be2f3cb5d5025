"""The experiment harness: bundled models and data sets, sweeps and their reports."""
