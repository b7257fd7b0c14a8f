"""Where the OpenAI API key and endpoint come from: the argument, the environment, then a ``.env`` file.

A ``.env`` file is read, never loaded into the environment. With ``backend="modal"`` the key comes
from a Modal secret inside the container instead, and never leaves this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OptionsError

__all__ = ["MissingAPIKey", "resolve_api_key", "resolve_base_url"]


class MissingAPIKey(OptionsError):
    """No API key was found; raised before any request."""



def _dotenv() -> dict[str, str]:
    """``OPENAI_*`` values from a ``.env`` file in the working directory or above; the environment is left alone."""
    try:
        from dotenv import dotenv_values, find_dotenv
    except ImportError:
        if Path(".env").is_file():
            raise MissingAPIKey("there is a .env file here, but python-dotenv, which reads it, isn't installed: "
                                "pip install python-dotenv") from None
        return {}
    path = find_dotenv(usecwd=True)
    if not path:
        return {}
    return {k: v for k, v in dotenv_values(path).items() if k.startswith("OPENAI_") and v}


def resolve_api_key(api_key: str | None) -> str | None:
    """``api_key``, else ``OPENAI_API_KEY``, else ``OPENAI_API_KEY`` from a ``.env`` file; else ``None``.

    Examples
    --------
    >>> resolve_api_key("sk-given")
    'sk-given'
    """
    return _given_or_configured(api_key, "OPENAI_API_KEY")


def resolve_base_url(base_url: str | None) -> str | None:
    """``base_url``, else ``OPENAI_BASE_URL`` (environment, then ``.env``); ``None`` means OpenAI's own.

    Examples
    --------
    >>> resolve_base_url("http://localhost:8000/v1")
    'http://localhost:8000/v1'
    """
    return _given_or_configured(base_url, "OPENAI_BASE_URL")


def _given_or_configured(given: str | None, variable: str) -> str | None:
    """``given``, else the environment ``variable``, else that variable from a ``.env`` file."""
    return given or os.environ.get(variable) or _dotenv().get(variable) or None
