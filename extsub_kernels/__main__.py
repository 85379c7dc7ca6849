"""`python -m extsub_kernels`: the same command line as `extsub-merge`."""

import sys

from extsub_kernels.cli import main

sys.exit(main())
