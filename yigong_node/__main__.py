"""``python -m yigong_node``: the ``yigong`` command."""

import sys

from yigong_node.cli import main

sys.exit(main())
