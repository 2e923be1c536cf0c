"""What the daemon tells the world: STATUS=, metrics, advisories, estimates, the status report."""
