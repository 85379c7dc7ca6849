"""`python -m extsub_kernels.cli`: the same command line as `extsub-merge`."""

import sys

from extsub_kernels.cli.merge import main

sys.exit(main())
