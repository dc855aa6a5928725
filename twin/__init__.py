"""microgrid-twin: a digital twin for battery microgrids of new and second-life EV packs."""

__version__ = "0.1.0"

__all__ = ["__version__"]
