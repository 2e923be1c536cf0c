"""The real-kernel VM test bed: a throwaway qemu guest with Debian's kernel and device-mapper.

``python -m tests.vm run [options] -- CMD ARGS...`` boots a guest that sees the host's root
read-only (9p + tmpfs overlay), runs CMD there as root and exits with its exit code.
``python -m tests.vm prepare`` fetches and caches the kernel and builds the initramfs.
``tests/conftest.py`` uses the same pieces to run the ``kernel`` and ``systemd`` tests in a guest.
"""
