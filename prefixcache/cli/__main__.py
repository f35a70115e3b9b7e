"""``python -m prefixcache.cli``: the same command as the ``prefixcache`` console script."""

from . import app

app()
