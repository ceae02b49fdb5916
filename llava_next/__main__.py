"""`python -m llava_next ...` is the `llava-next` command (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
