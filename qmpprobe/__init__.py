"""qmpprobe: ask QEMU over QMP what every CPU model is on every machine type."""

__version__ = "0.5.0"
