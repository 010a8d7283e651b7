"""Reports from finished runs: one run (`evaluate`), a chain of rounds (`rounds`), where a stage stopped
improving (`convergence`), and the figures and tables they share (`figures`)."""
