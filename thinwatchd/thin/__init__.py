"""The dm-thin target's own language, typed: its table lines and its status lines."""
