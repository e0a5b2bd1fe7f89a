"""Command line: ``regnet-zoo`` / ``python -m regnet_zoo`` (placeholder until the CLI issue lands)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    print("regnet-zoo: command line not implemented yet", file=sys.stderr)
    return 2
