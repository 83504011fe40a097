"""``python -m vaeguard``: the command line (what ``torchrun -m vaeguard fit ...`` starts on every rank)."""

from vaeguard.cli import main

if __name__ == "__main__":
    main()
