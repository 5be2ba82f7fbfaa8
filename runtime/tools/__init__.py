"""Tools around the product, never on its path: benchmarks (`vlmspec bench`) and tiny-model builders."""
