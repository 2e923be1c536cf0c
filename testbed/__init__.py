"""What tests/ and bench/ share: the daemon on the fake kernel, and on the real one."""
