"""`python -m jobqd`: the daemon, as the `jobqd` command."""

from jobqd.cli.daemon import main

raise SystemExit(main())
