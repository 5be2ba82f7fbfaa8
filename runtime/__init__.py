"""vlmspec.runtime: making it happen. Every side effect lives here."""
