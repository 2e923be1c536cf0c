"""What every layer speaks: errors, units of size, logging, the event loop and its workers, and
systemd's notifications."""
