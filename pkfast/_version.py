"""The version of pkfast (one place: the package, the CLI and the stored manifests read it)."""

__version__ = "0.2.0"
