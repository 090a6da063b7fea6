"""``python -m trademd``: the ``trade-md`` command, also as ``torchrun ... -m trademd train ...``."""

from trademd.cli.app import main

if __name__ == "__main__":
    main()
