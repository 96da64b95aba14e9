"""``python -m haframe_ext.cli``: the ``haframe`` command."""

import sys

from .parser import main

sys.exit(main())
