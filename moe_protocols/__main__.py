"""``python -m moe_protocols``: the ``moe-protocols`` command."""

from __future__ import annotations

import sys

from moe_protocols.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m moe_protocols"))
