"""The runner: the one place that joins probing and the run folder."""
