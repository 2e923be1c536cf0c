"""Growth policy, pure: low-water marks, fill rates, room on the host filesystem, decisions."""
