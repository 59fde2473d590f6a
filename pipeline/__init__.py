"""peftflow: a reproducible fine-tuning pipeline for parameter-efficient methods (README.md, docs/).

Run before any module of the package (and so before torch, transformers, PEFT or bitsandbytes are imported by
one): library chatter a user cannot act on stays off their terminal unless PEFTFLOW_VERBOSE=1 asks for it:
bitsandbytes' import-time warning about an optional kernel package, transformers' advisory warnings and logging
below errors, FutureWarning and DeprecationWarning from the libraries. The project's own messages are unchanged.
"""

import logging
import os
import warnings

if os.environ.get("PEFTFLOW_VERBOSE", "") in ("", "0"):
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
