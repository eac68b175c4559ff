"""GhostNet models and their registry."""
