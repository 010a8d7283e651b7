"""The method as pure tensor functions: similarity, losses and hash-term statistics (`hashing`), the discrete
code update (`dcc`), retrieval metrics (`metrics`). No I/O, no torch.distributed."""
