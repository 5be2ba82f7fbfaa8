"""Benchmarks users can run on their own tables: each writes a results JSON and a Markdown table."""
