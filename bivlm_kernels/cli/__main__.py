"""``python -m bivlm_kernels.cli``: the ``bivlm`` command."""
import sys

from . import main

sys.exit(main())
