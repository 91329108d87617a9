"""Which combos a run probes (no QEMU started)."""
