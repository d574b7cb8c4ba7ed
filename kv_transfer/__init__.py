"""pdcluster: kv_transfer (see DESIGN.md)."""
