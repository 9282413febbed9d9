"""`python -m infinilm_svc`: the same as the pyz."""
import sys

from .cli import main

sys.exit(main())
