"""Fixtures of the comparison tests: one throwaway functionary key that signs every side."""

from __future__ import annotations

import pytest
from securesystemslib.signer import CryptoSigner


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()
