"""``python -m r1_train`` is ``r1-train``."""

from r1_train.cli import main

raise SystemExit(main())
