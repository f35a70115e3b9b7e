"""``python -m prefixcache``: the same command as the ``prefixcache`` console script."""

from .cli import app

app()
