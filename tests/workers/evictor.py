"""Evicts every unpinned segment in a loop until killed (races restores in other processes)."""

from __future__ import annotations

import sys
import time

from prefixcache import DiskStore
from prefixcache.lifecycle import enforce_quota

store = DiskStore(sys.argv[1])
print("ready", flush=True)
while True:
    enforce_quota(store, 0, time.time())
    time.sleep(0.01)
