"""One pool and its files: bring it up (build or adopt), and act on it in place."""
