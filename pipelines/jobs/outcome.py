"""How a job ends, as the command line reports it: exit codes, `CommandExit`, and the logging setup every entry
point shares (qarm's own packages at INFO, third-party libraries at WARNING unless verbose)."""
from __future__ import annotations

import logging
import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REJECTED, EXIT_LOCKED = 0, 1, 2, 3, 4


class CommandExit(Exception):
    """Raised by a command to end with a specific exit code and a machine-readable result."""

    def __init__(self, code: int, message: str, result: dict | None = None):
        super().__init__(message)
        self.code = code
        self.result = result or {}


QARM_LOGGERS = ("pipelines", "ranker", "quant", "feature_store", "__main__")
NOISY_LOGGERS = ("apache_beam", "transformers", "faiss", "timm", "open_clip", "torch", "torchrec", "fbgemm_gpu",
                 "urllib3", "matplotlib", "PIL", "filelock", "huggingface_hub", "absl", "numexpr", "root")


def configure_logging(verbose: bool = False) -> None:
    """INFO for qarm's own packages; third-party loggers at WARNING unless ``verbose`` (``-v``)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for name in QARM_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        try:  # transformers keeps its own verbosity switch (load reports go through it)
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_warning()
            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - transformers is a dependency
            pass
