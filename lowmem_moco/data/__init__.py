"""Images in, two views out: image sets, sources, the decoded cache, augmentations, the input pipeline."""
