"""Images in, two views out. sources/: the image sets and where they come from; stores/: the
caches and stores the batched path reads batches from; augment/: the MoCo v2 views, per image
and batched. At the top, the plumbing that joins them: the training input (pipeline.py), the
per-image path's inputs and the eval loader (two_views.py), views made when the step asks
(lazy_views.py), the one DataLoader factory (loader.py) and the `views` command's picture
(view_grid.py)."""
