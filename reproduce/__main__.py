"""Entry point of ``python -m reproduce``."""

import os
import sys

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "3"
)  # keep TensorFlow's C++ start-up chatter off stderr

from reproduce.cli import main  # noqa: E402

if __name__ == "__main__":  # not in the worker processes of `all --jobs N`
    sys.exit(main())
