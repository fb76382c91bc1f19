"""The living reference index: versioned faiss shards, id map, tombstones and the normalisation
background on disk (:mod:`~ensemble.index.layout`), written one immutable version at a time
(:mod:`~ensemble.index.versions`) and read back for search (:mod:`~ensemble.index.reader`)."""
