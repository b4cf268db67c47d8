"""The provenance layer: the only code that imports in_toto and securesystemslib.

keys    dev key generation, signer URIs, public-key files and fingerprints
links   building, signing and reading in-toto links (DSSE)
layout  compiling a pipeline config into an owner-signed in-toto layout
verify  one orchestrator over small named checks, for runs and release bundles
"""
