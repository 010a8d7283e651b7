"""The ground floor: one-line errors and exit codes, atomic writes, the folder formats and the code format.
Every other part may import these; they import nothing of dihn_dist."""
