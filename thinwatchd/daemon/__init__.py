"""The daemon: the event loop's wiring, dm and udev events, one instance per host."""
