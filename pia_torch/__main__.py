"""`python -m pia_torch ...` is `pia-torch ...`."""

import sys

from pia_torch.cli import main

sys.exit(main())
