"""The methods: each a file of pure formula functions plus a thin class on the core."""
