"""Errors that end a command with one clear line instead of a traceback."""


class InputError(Exception):
    """Bad usage or input (missing QEMU, unknown machine, broken run folder): exit code 2."""


class Interrupted(Exception):
    """The run was stopped by SIGINT/SIGTERM; what was probed is saved: exit code 3."""
