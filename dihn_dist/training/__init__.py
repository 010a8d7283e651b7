"""A training run: flags (`config`), the stage table and seeded draws (`stages`), the outer loop of Algorithm 1
(`loop`), the run folder's writer (`runfolder`) and torch-free reader (`run_reader`), logs and TensorBoard
(`reporting`)."""
