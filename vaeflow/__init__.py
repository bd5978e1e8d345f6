"""vaeflow: variational autoencoders with normalizing-flow posteriors (FFJORD, planar, IAF,
Sylvester), trained from scripts or used as Pyro guide transforms."""

__version__ = "0.1.0"
