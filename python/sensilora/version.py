"""The package version (one place: the CLI's --version, provenance and the public ``sensilora.__version__``)."""

__version__ = "0.1.0"
