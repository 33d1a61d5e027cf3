"""Shared test set-up."""

import locale

import pytest


@pytest.fixture(autouse=True)
def _environment_locale() -> None:
    # Some native library in the stack can leave LC_CTYPE at "C" (ASCII), after which
    # torch.compile's inductor fails to read its UTF-8 templates; every test starts from the
    # environment's locale, as a fresh `semiseg` process would.
    locale.setlocale(locale.LC_CTYPE, "")
