"""store: what pkfast writes to disk and reads back — the shared file conventions (:mod:`~pkfast.store.formats`:
manifests, checksums, atomic writes), stored Grams (:mod:`~pkfast.store.writer`, :mod:`~pkfast.store.reader`),
path-feature files (:mod:`~pkfast.store.features`) and where finished tiles go (:mod:`~pkfast.store.sinks`)."""

from pkfast.store.reader import StoredGram, StoreError, open_gram

__all__ = ["StoredGram", "StoreError", "open_gram"]
