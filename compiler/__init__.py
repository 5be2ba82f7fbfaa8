"""vlmspec.compiler: what should happen. Pure and deterministic: no lance, pyarrow or torch."""
