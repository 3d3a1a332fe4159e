"""``python -m sparsemm_utils.tiny_reader``: the reader's command line (:mod:`.cli`)."""

import sys

from sparsemm_utils.tiny_reader.cli import main

sys.exit(main())
