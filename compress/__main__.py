"""``python -m compress``: the command line, as ``compress`` (so that ``torchrun -m compress train ...`` works)."""
from cli.main import main

raise SystemExit(main())
