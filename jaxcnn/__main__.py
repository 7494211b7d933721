"""``python -m jaxcnn``: the ``jaxcnn`` command (see :mod:`jaxcnn.cli`)."""

import sys

from jaxcnn.cli import main

sys.exit(main())
