"""genderid: train, tune and serve a CelebA gender classifier on Ray."""

__version__ = "0.1.0"
