"""The run folder and the shared cache: files written and read back, checked."""
