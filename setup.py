from setuptools import setup  # the metadata is in pyproject.toml

setup()
