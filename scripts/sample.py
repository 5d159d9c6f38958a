#!/usr/bin/env python
"""`python scripts/sample.py ...` is `pia-torch ...` (the CLI lives in pia_torch/cli.py)."""

import sys

from pia_torch.cli import main

if __name__ == "__main__":
    sys.exit(main())
