"""Image sets and where they come from: the labelled image sets (images.py: listed files or one
array, the train/val split, the small-images warning), decoding a file to RGB pixels and naming
an unreadable one (decoding.py), the sources `cfg.data.source` picks (registry.py's
`build_datasets`: image folders in folders.py, CIFAR-10 and the fast.ai archives in
downloads.py, the synthetic set in synthetic.py)."""
