"""`python -m extsub_kernels`: the same command line as `extsub-merge`."""

from extsub_kernels.cli import main

raise SystemExit(main())
