"""t2i-evolve: improve text-to-image diffusion models with automated feedback.

Start with `t2i_evolve.protocols` (the shared parts) and `t2i_evolve.world` (the built-in shapes world).
"""

__version__ = "0.1.0"
