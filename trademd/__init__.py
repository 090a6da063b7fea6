"""trade-md: equilibrium samples of molecules at temperatures never simulated (TRADE)."""

__version__ = "0.1.0"
