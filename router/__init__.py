"""pdcluster: router (see DESIGN.md)."""
