"""Drift, compat causes, diffs and explanations, from run folders only."""
