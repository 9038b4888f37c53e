"""Entry point of ``python -m fingerprints``."""

import os
import sys

os.environ.setdefault(
    "TF_CPP_MIN_LOG_LEVEL", "3"
)  # keep TensorFlow's C++ start-up chatter off stderr

from fingerprints.cli import main  # noqa: E402

sys.exit(main())
