"""``python -m sparsemm_utils.study_model`` (see :mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
