"""The kernel-ABI layer: device-mapper, loop devices, udev sync and file operations by syscall.

Only this package imports fcntl, struct or ctypes. Everything above it sees the Protocols in
``thinwatchd.kernel.api``; the other modules are their real implementations.
"""
