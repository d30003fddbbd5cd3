"""`python -m minisd.train [vae|unet|all] ...`: the same as `minisd train ...`."""
import sys

from .cli import main

sys.exit(main())
