"""Model-runner hooks for HASS dynamic trees (filled in by the tree issue)."""


def install() -> None:
    return None
