"""``python -m visionpeft COMMAND ...`` (the ``visionpeft`` command; ``accelerate launch -m visionpeft train ...``)."""

import sys

from .cli import main

sys.exit(main())
