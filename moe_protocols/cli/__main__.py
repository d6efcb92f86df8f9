"""``python -m moe_protocols.cli``: the ``moe-protocols`` command."""

from __future__ import annotations

import sys

from moe_protocols.cli._main import main

if __name__ == "__main__":
    sys.exit(main())
