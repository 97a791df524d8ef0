"""Logging set-up shared by the HTTP process and the worker.

Diffusers and transformers print load reports on every model load; they are
harmless and drown real messages, so their loggers are raised to ERROR.
"""

from __future__ import annotations

import logging
import os

_NOISY = ("diffusers", "transformers", "peft", "accelerate", "botocore", "urllib3", "s3transfer")


def configure_logging(level: str = "info") -> None:
    """One line per record, with the process name so HTTP and worker lines can be told apart.

    Call it before diffusers/transformers are imported: they read their verbosity
    and progress-bar switches from the environment when first imported.
    """
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        force=True,
    )
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
