"""The test suite (a package: modules import each other as ``tests.*``)."""
