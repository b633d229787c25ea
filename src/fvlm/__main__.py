"""``python -m fvlm ...`` (also what ``torchrun -m fvlm train ...`` runs)."""

from fvlm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
