"""fastshower: fast simulation of particle showers with deep generative models.

The chain: simulate (reference Monte Carlo) -> train -> generate -> evaluate -> export/bench.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
