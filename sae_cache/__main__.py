"""`python -m sae_cache`: see sae_cache.cli."""

import sys

from sae_cache.cli import main

sys.exit(main())
