"""The probing side: QEMU processes, one combo's reading, the guest phase."""
