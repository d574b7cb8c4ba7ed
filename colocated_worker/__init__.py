"""pdcluster: colocated_worker (see DESIGN.md)."""
