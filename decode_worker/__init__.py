"""pdcluster: decode_worker (see DESIGN.md)."""
