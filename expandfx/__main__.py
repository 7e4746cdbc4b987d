"""``python -m expandfx`` is the ``expandfx`` command line (see ``expandfx --help``)."""

from expandfx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
