"""pdcluster: prefill_worker (see DESIGN.md)."""
