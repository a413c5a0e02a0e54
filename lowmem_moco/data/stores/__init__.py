"""Where the batched path's images are kept between epochs: the decoded cache (decoded.py,
pixels memory-mapped), the encoded cache (encoded.py, the files' bytes packed and decoded per
batch, as EncodedImages of encoded_images.py) and the files themselves (encoded_store.py's
SourceFiles), the `data.cache` rule that picks one (choice.py), what the two caches share on
disk (packed.py: PackedEntry, the lock and the manifest switch; fingerprint.py: whether an entry
is current; sides.py: the size an image is kept at) and the batch they hand out (ragged.py)."""
