"""The hashing networks and mixed precision (`networks`) and the seeded device augmentation (`augment`)."""
