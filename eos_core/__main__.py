"""`python -m eos_core`: the `eos-core` command line ([`eos_core.cli`][])."""

from eos_core.cli import main

raise SystemExit(main())
