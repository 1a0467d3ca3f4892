"""pixrun: train text-to-image diffusion models from scratch in pixel space."""

__version__ = "0.1.0"
