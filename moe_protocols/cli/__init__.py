"""The ``moe-protocols`` command: inspect how a model resolves, verify it, run the EPLB demo.

Exit codes: 0 success; 1 the model is not (and wraps no) MixtureOfExperts, a
``verify`` check failed, or the demo saw outputs change; 2 bad usage
(argparse, invalid option values, ``verify`` without usable inputs); 3 the
model (or ``--inputs``) factory could not be loaded or built, or an optional
dependency (matplotlib for ``--plot``) is missing (:mod:`._exit` names them).

One module per command (``_inspect``, ``_verify``, ``_demo``, ``_profile``)
adds its arguments and runs it; ``_target`` loads ``MODULE:ATTR`` targets and
``_types`` checks option values. Only the parts a command runs import torch,
so ``moe-protocols --help`` stays fast. Nothing in the library imports this
package.
"""

from __future__ import annotations

from moe_protocols.cli._main import build_parser, main

__all__ = ["build_parser", "main"]
