"""Storage: the schema, engines, migrations and the per-backend differences.

Handlers and analytics never build engines or write dialect SQL themselves;
they go through this package.
"""

from db.engine import Backend, backend_of, make_engine
from db.hits import HitBatch, HitStore, NewHit, StorageUnavailable

__all__ = [
    "Backend",
    "HitBatch",
    "HitStore",
    "NewHit",
    "StorageUnavailable",
    "backend_of",
    "make_engine",
]
