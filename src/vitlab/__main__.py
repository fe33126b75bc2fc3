"""`python -m vitlab` (and `torchrun ... -m vitlab`): the `vitlab` command."""

import os
import sys

from vitlab.launch import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.exit(main())
