"""The Textual UI of the FANNY field kit: :func:`make_app` builds it around an engine."""

from .app import EngineEvent, FannyApp, make_app

__all__ = ["EngineEvent", "FannyApp", "make_app"]
