"""Legacy shim: all metadata lives in pyproject.toml (PEP 621).

pkfast is pure Python; nothing under csrc/ is compiled at install time (see csrc/README.md).
"""
from setuptools import setup

setup()
