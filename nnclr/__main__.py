"""``python -m nnclr`` (the form ``torchrun -m nnclr`` uses)."""

from nnclr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
