"""Developer benchmarks: measuring tools, not part of the product's call path.

``personagate bench ...`` imports these lazily (personagate/cli.py); figures and commands are in
docs/benchmarks.md.
"""
