"""moecli: products and mixtures of experts, trained and compared from the command line.

Importing the package is cheap on purpose (no torch): `moecli --help` must answer at once.
"""

__version__ = "0.1.0"
