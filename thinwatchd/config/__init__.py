"""The YAML config, read strictly into validated, frozen Settings."""
