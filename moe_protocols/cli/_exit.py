"""The exit codes of the ``moe-protocols`` command, each with what it means (the one place).

Every command returns one of these; ``main`` returns :data:`EXIT_LOAD_ERROR`
for whatever escapes a command, so no error ever exits 0.
"""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_LOAD_ERROR", "EXIT_NOT_MOE", "EXIT_OK", "EXIT_USAGE"]

EXIT_OK: Final = 0
"""Success."""
EXIT_NOT_MOE: Final = 1
"""The model is not (and wraps no) MixtureOfExperts, a ``verify`` check failed, recording
failed, or the demo saw outputs change."""
EXIT_USAGE: Final = 2
"""Bad usage: argparse's own errors, invalid option values or combinations, ``verify``
without usable inputs, a placement that cannot be saved."""
EXIT_LOAD_ERROR: Final = 3
"""The model (or ``--inputs``) could not be imported or built, an optional dependency
(matplotlib for ``--plot``) is missing, or an unexpected error escaped the command."""
