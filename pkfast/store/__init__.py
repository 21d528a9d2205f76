"""store: what pkfast writes to disk and reads back — the shared file conventions (:mod:`~pkfast.store.formats`:
manifests, checksums, atomic writes, fingerprints), the chunked store that a Gram's tiles and path features' row
chunks are written into (:mod:`~pkfast.store.writer`, read by :mod:`~pkfast.store.reader`, shared by ranks in
:mod:`~pkfast.store.ranks`), path-feature files (:mod:`~pkfast.store.features`) and where finished tiles go
(:mod:`~pkfast.store.sinks`)."""

from pkfast.store.reader import StoredGram, StoreError, open_gram

__all__ = ["StoredGram", "StoreError", "open_gram"]
