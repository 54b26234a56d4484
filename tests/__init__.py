"""The test suite (a regular package, so `tests.*` imports resolve here and not to a `tests` package some dependency installs)."""
