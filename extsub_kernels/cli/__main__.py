"""`python -m extsub_kernels.cli`: the same command line as `extsub-merge`."""

from extsub_kernels.cli.merge import main

raise SystemExit(main())
