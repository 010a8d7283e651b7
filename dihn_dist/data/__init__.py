"""From a dataset on disk to batches: dataset adapters (`sources`), preparation into FFCV files (`prepare`,
with `split`, `parts`, `manifest`, `writer`, and `extend` for a new round), the checked preparation
(`prepared`) and the loaders (`loader`)."""
