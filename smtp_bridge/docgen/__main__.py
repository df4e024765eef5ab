"""``python -m smtp_bridge.docgen``: regenerate the reference pages of docs/."""

import sys

from . import main

sys.exit(main())
