"""``python -m fastshower`` (also what ``torchrun -m fastshower`` runs)."""

from fastshower.cli import main

raise SystemExit(main())
