"""`python -m qmpprobe` runs the command line."""

from qmpprobe.cli import main

raise SystemExit(main())
