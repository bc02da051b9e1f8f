"""txt2img: find, serve, fine-tune and deploy Stable Diffusion models.

The Python API lives in the ``catalog``, ``serving`` and ``training`` packages; this package
holds the ``txt2img`` command line.
"""

__version__ = "0.1.0"
