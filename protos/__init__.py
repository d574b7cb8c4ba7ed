"""pdcluster: protos (see DESIGN.md)."""
