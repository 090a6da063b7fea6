"""The ``trade-md`` command line (installed as ``trademd.cli``): a thin Typer skin."""
