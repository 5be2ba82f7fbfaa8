"""Training from cached columns: the loop, its loader and direct reads, and data-parallel comms."""
