"""Models by name: the catalogue, the cache of downloaded files, and verified downloads."""
