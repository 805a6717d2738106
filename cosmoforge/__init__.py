"""cosmoforge: synthetic pre-training data after the Cosmopedia recipe, on a laptop or a GPU cluster."""

__version__ = "0.1.0"
