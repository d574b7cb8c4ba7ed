"""pdcluster: cluster (see DESIGN.md)."""
