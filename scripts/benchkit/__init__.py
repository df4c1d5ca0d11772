"""The pieces of `scripts/bench`: workloads, systems under test, statistics and the report."""
